"""BatchNorm under jit with the batch sharded over 8 (simulated CPU) devices has SyncBN semantics:
the train-mode outputs, gradients and updated running statistics equal those on 1 device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsp_jax.models.deeplab import DeepLabConfig
from zsp_jax.references.deeplab import random_model
from zsp_jax.utils.bench import relative_error

TOL = 1e-4  # fp32 (the project's parity bar); only the order of the cross-device reductions differs


def _step(graphdef, state, x, y, with_grads, need_fp=True):
    """A pure train step: UniMatch-style forward with the feature perturbation (the model's own
    dropout stream; off with ``need_fp=False``), a loss, optionally its gradients, and the updated
    state (BN statistics, RNG counter)."""
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
        if not need_fp:
            logits = model(x, train=True)
            return jnp.mean(jnp.square(logits - y)), (logits, None)
        logits, logits_fp = model(x, train=True, need_fp=True)
        loss = jnp.mean(jnp.square(logits - y)) + 0.5 * jnp.mean(jnp.square(logits_fp - y))
        return loss, (logits, logits_fp)

    if with_grads:
        (loss, outs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    else:
        (loss, outs), grads = loss_fn(model), None
    return loss, outs, grads, nnx.state(model)


def _run(n_devices, graphdef, state, x, y, with_grads=False, need_fp=True):
    assert jax.device_count() >= n_devices
    mesh = Mesh(np.array(jax.devices()[:n_devices]), ("data",))  # Auto axes (not jax.make_mesh)
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (jax.device_put(state, replicated), jax.device_put(x, batch), jax.device_put(y, batch))
    compiled = jax.jit(_step, static_argnums=(0, 4, 5)).lower(graphdef, *args, with_grads, need_fp).compile()
    return compiled(*args), compiled.as_text()


def _setup(dtype):
    config = DeepLabConfig.tiny_resnet()
    model = random_model(config, seed=0, dropout_seed=1, param_dtype=dtype)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 65, 65, 3)), dtype)
    y = jnp.asarray(rng.normal(size=(8, 65, 65, config.num_classes)), dtype)
    return graphdef, state, x, y


@pytest.fixture(scope="module")
def setup():
    return _setup(jnp.float32)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
            if np.issubdtype(np.asarray(v).dtype, np.floating)}


def _stats(graphdef, state):
    return _flat(nnx.state(nnx.merge(graphdef, state), nnx.BatchStat))


def test_8_devices_equal_1_device_fp32(setup):
    """Outputs and updated running statistics in fp32."""
    graphdef, state, x, y = setup
    (loss1, outs1, _, state1), _ = _run(1, graphdef, state, x, y)
    (loss8, outs8, _, state8), hlo8 = _run(8, graphdef, state, x, y)
    assert "all-reduce" in hlo8  # the batch statistics are reduced across devices
    assert len(outs8[0].sharding.device_set) == 8  # the outputs stay sharded over the batch
    assert abs(float(loss1) - float(loss8)) <= TOL * abs(float(loss1))
    for a, b in zip(outs1, outs8):
        assert relative_error(b, a) <= TOL
    s0, s1, s8 = _stats(graphdef, state), _stats(graphdef, state1), _stats(graphdef, state8)
    assert len(s1) > 0
    for k in s1:
        assert relative_error(s8[k], s1[k]) <= TOL, k
    # the running statistics moved: the comparison above is not between two untouched states
    assert max(relative_error(s1[k], s0[k]) for k in s1) > 1e-3


def test_8_devices_equal_1_device_fp64_with_gradients():
    """The same in fp64, gradients included. In fp32 the gradients of train-mode BatchNorm over
    near-constant channels (a random tiny model has some) are dominated by rounding: they differ
    from fp64 by tens of percent on one device already, so fp64 is where equality is testable."""
    with jax.enable_x64(True):
        graphdef, state, x, y = _setup(jnp.float64)
        (loss1, outs1, grads1, state1), _ = _run(1, graphdef, state, x, y, with_grads=True)
        (loss8, outs8, grads8, state8), _ = _run(8, graphdef, state, x, y, with_grads=True)
        assert outs8[0].dtype == jnp.float64
        for a, b in zip(outs1, outs8):
            assert relative_error(b, a) <= 1e-12
        g1, g8 = _flat(grads1), _flat(grads8)
        assert g1.keys() == g8.keys() and len(g1) > 100
        for k in g1:
            assert relative_error(g8[k], g1[k]) <= 1e-9, k
        s1, s8 = _stats(graphdef, state1), _stats(graphdef, state8)
        for k in s1:
            assert relative_error(s8[k], s1[k]) <= 1e-12, k


def test_per_device_statistics_would_differ(setup):
    """Control: BatchNorm over each device's sample alone (what plain BN under pmap gives) is far
    from the global result, so the test above would notice non-synchronised statistics. Without
    the feature perturbation, so that only the statistics differ (not the dropout masks drawn)."""
    graphdef, state, x, y = setup
    (_, outs_global, _, _), _ = _run(1, graphdef, state, x, y, need_fp=False)
    local = [_run(1, graphdef, state, x[i:i + 2], y[i:i + 2], need_fp=False)[0][1][0] for i in range(0, 8, 2)]
    assert relative_error(np.concatenate(local), outs_global[0]) > 1e-2

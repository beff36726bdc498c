"""``DptSegmenter`` with its DINOv2 encoder against V2's ``DPT`` on the DINOv2 reference (transformers'
Dinov2Model resampling its positional embedding as DINOv2 does), every tensor randomised, weights
moved through the V2 converter: logits (the final resize included) at patch grids 7x9 and 9x7,
complementary dropout with the same masks on both sides, gradients of every parameter, bf16, and a
batch sharded over 8 devices.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.dpt.helpers import dinov2_pair, flat_grads, nchw_to_nhwc, nhwc_to_nchw, random_images, v2_state_dict
from zsp_jax.models.dpt import DptConfig
from zsp_jax.models.dpt.convert import convert_segmenter_state_dict
from zsp_jax.references import unimatch_v2_model as ref_lib
from zsp_jax.utils.bench import relative_error

FP32_TOL = 1e-4
CONFIG = DptConfig.tiny()
SIZES = [(98, 126), (126, 98)]


@pytest.fixture(scope="module")
def pair():
    return dinov2_pair(CONFIG, seed=2)


def _ref(ref, x, **kw):
    with torch.no_grad():
        return nchw_to_nhwc(ref(nhwc_to_nchw(x), **kw))


@pytest.mark.parametrize("size", SIZES)
def test_logits_fp32(pair, size):
    ref, ours = pair
    x = random_images(2, *size, seed=1)
    o = nnx.jit(lambda m, a: m(a))(ours, jnp.asarray(x))
    r = _ref(ref, x)
    assert o.shape == r.shape == (2, *size, CONFIG.num_classes)
    assert relative_error(o, r) <= FP32_TOL


@pytest.mark.parametrize("size", SIZES)
def test_complementary_dropout_fp32(pair, size):
    ref, ours = pair
    x = random_images(4, *size, seed=2)
    mask = ref_lib.draw_complementary_mask(4, CONFIG.embed_dim, generator=torch.Generator().manual_seed(3))
    o = nnx.jit(lambda m, a, k: m(a, comp_drop_mask=k))(ours, jnp.asarray(x), jnp.asarray(mask.numpy()))
    r = _ref(ref, x, comp_drop=True, comp_drop_mask=mask)
    assert relative_error(o, r) <= FP32_TOL
    assert relative_error(o, _ref(ref, x)) > 1e-2  # the mask changed the logits


def test_gradients_fp32():
    """d(sum(logits * g))/d(every parameter), encoder and head, with complementary dropout."""
    ref, ours = dinov2_pair(CONFIG, seed=4)
    ref.train()  # no dropout anywhere: train mode only enables autograd bookkeeping here
    x = random_images(2, 98, 126, seed=5)
    mask = ref_lib.draw_complementary_mask(2, CONFIG.embed_dim, generator=torch.Generator().manual_seed(6))
    g = np.random.default_rng(7).normal(size=(2, 98, 126, CONFIG.num_classes)).astype(np.float32)
    out = ref(nhwc_to_nchw(x), comp_drop=True, comp_drop_mask=mask)
    (out.permute(0, 2, 3, 1) * torch.from_numpy(g)).sum().backward()
    # the reference's gradients in V2's checkpoint layout, through the converter: a copy holding them as weights
    holder = copy.deepcopy(ref)
    with torch.no_grad():
        for (name, p), (_, src) in zip(holder.named_parameters(), ref.named_parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    expected = convert_segmenter_state_dict(v2_state_dict(holder), CONFIG, source_name="reference grads").weights

    def loss_fn(model, a, m, w):
        return jnp.sum(model(a, comp_drop_mask=m) * w)

    got = flat_grads(nnx.jit(nnx.grad(loss_fn))(ours, jnp.asarray(x), jnp.asarray(mask.numpy()), jnp.asarray(g)))
    assert set(got) == set(expected)
    assert np.all(got["backbone.mask_token"] == 0)  # never read by the forward, as in DINOv2
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    for key, value in got.items():
        # per tensor against its own largest entry, floored at 1e-3 of the largest gradient of the model
        # (a few encoder gradients are tiny sums of cancelling terms)
        err = float(np.max(np.abs(value - expected[key])))
        assert err <= FP32_TOL * max(float(np.max(np.abs(expected[key]))), 1e-3 * scale), key


def test_bf16_deviation(pair):
    """bf16 compute (fp32 parameters) against fp32: relative error of the logits <= 1.5e-2 (measured 5e-3)."""
    _, ours32 = pair
    _, ours16 = dinov2_pair(CONFIG, seed=2, dtype=jnp.bfloat16)
    x = jnp.asarray(random_images(2, 98, 126, seed=8))
    o32 = nnx.jit(lambda m, a: m(a))(ours32, x)
    o16 = nnx.jit(lambda m, a: m(a))(ours16, x)
    assert o16.dtype == jnp.float32
    err = relative_error(o16, o32)
    assert 0 < err <= 1.5e-2, err


def test_sharded_batch_with_drawn_masks(pair, num_devices):
    """Batch over P("data") on an 8-device mesh, complementary-dropout mask drawn inside the jitted
    call from a key: equal to the 1-device run."""
    _, ours = pair
    x = jnp.asarray(random_images(num_devices, 98, 126, seed=9))
    key = jax.random.key(10)
    fn = nnx.jit(lambda m, a, k: m(a, comp_drop_key=k))
    single = np.asarray(fn(ours, x, key))
    mesh = Mesh(np.array(jax.devices()).reshape(num_devices), ("data",))
    out = fn(ours, jax.device_put(x, NamedSharding(mesh, P("data"))), key)
    assert out.sharding.spec[0] == "data"
    assert relative_error(out, single) <= 1e-6

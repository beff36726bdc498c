"""The full segmenter (``DptSegmenter``) against V2's ``DPT.forward`` on a stand-in encoder injected on
both sides (``tests.dpt.helpers``): final resize, complementary dropout with shared masks, the mask
draw, gradients, ``lock_backbone``, sharding and bf16. The same checks with the DINOv2 encoder are
in ``dinov2_model_parity_test.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.dpt.helpers import flat_grads, nchw_to_nhwc, nhwc_to_nchw, random_images, stand_in_pair
from zsp_jax.models.dpt import (DptHeadConfig, complementary_dropout_mask, complementary_mask_from_half,
                                param_group_labels)
from zsp_jax.models.dpt.convert import convert_head
from zsp_jax.references import unimatch_v2_model as ref_lib
from zsp_jax.utils.bench import relative_error

FP32_TOL = 1e-4
HEAD = DptHeadConfig.tiny()
SIZES = [(98, 126), (126, 98)]  # patch grids 7x9 and 9x7


@pytest.fixture(scope="module")
def pair():
    return stand_in_pair(HEAD, seed=3)


def _ref_logits(ref, x, **kw):
    with torch.no_grad():
        return nchw_to_nhwc(ref(nhwc_to_nchw(x), **kw))


def _mask_numpy(batch: int, channels: int, seed: int) -> np.ndarray:
    """A complementary mask drawn by the reference's V2 code (torch generator)."""
    return ref_lib.draw_complementary_mask(batch, channels, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("size", SIZES)
def test_logits_fp32(pair, size):
    ref, ours, config = pair
    x = random_images(2, *size, seed=1)
    o = nnx.jit(lambda m, a: m(a))(ours, jnp.asarray(x))
    r = _ref_logits(ref, x)
    assert o.shape == r.shape == (2, *size, config.num_classes)
    assert o.dtype == jnp.float32
    assert relative_error(o, r) <= FP32_TOL


def test_output_size_rounds_down_to_patches(pair):
    """V2 resizes to (H // 14 * 14, W // 14 * 14); the stand-in accepts other sizes (DINOv2 refuses them)."""
    ref, ours, config = pair
    x = random_images(1, 100, 131, seed=2)
    o = nnx.jit(lambda m, a: m(a))(ours, jnp.asarray(x))
    r = _ref_logits(ref, x)
    assert o.shape == r.shape == (1, 98, 126, config.num_classes)
    assert relative_error(o, r) <= FP32_TOL


@pytest.mark.parametrize("size", SIZES)
def test_complementary_dropout_shared_masks(pair, size):
    """Both views of each pair are the same image, so outputs show exactly what the mask does:
    pairs left undropped equal the plain forward in both halves, the others differ between the
    halves (complementary channels) and from the plain forward."""
    ref, ours, config = pair
    half = random_images(4, *size, seed=3)
    x = np.concatenate([half, half])  # B = 8: rows i and 4 + i are the two views of image i
    mask = _mask_numpy(8, config.embed_dim, seed=4)
    kept = np.all(mask[:4] == 1, axis=1)
    assert kept.sum() == 2 and np.all(mask[4:][kept] == 1)
    o = nnx.jit(lambda m, a, k: m(a, comp_drop_mask=k))(ours, jnp.asarray(x), jnp.asarray(mask))
    r = _ref_logits(ref, x, comp_drop=True, comp_drop_mask=torch.from_numpy(mask))
    assert relative_error(o, r) <= FP32_TOL
    plain = np.asarray(nnx.jit(lambda m, a: m(a))(ours, jnp.asarray(x)))
    o = np.asarray(o)
    for i in range(4):
        if kept[i]:
            assert relative_error(o[i], plain[i]) <= 1e-6 and relative_error(o[4 + i], plain[i]) <= 1e-6
        else:
            assert relative_error(o[i], o[4 + i]) > 1e-2
            assert relative_error(o[i], plain[i]) > 1e-2 and relative_error(o[4 + i], plain[i]) > 1e-2


def _check_mask_structure(mask: np.ndarray, batch: int, channels: int) -> None:
    half = batch // 2
    assert mask.shape == (batch, channels)
    first, second = mask[:half], mask[half:]
    np.testing.assert_array_equal(first + second, 2)  # complementary: m and 2 - m, or 1 and 1
    kept = np.all(first == 1, axis=1)
    assert kept.sum() == int(half * 0.5)
    np.testing.assert_array_equal(second[kept], 1)
    assert set(np.unique(first[~kept])) <= {0.0, 2.0}


def test_mask_draw_matches_v2_structure():
    """Our draw and V2's (reference) satisfy the same invariants: halves sum to 2 per channel,
    int(B/2 * 0.5) pairs all ones, the rest 0/2 with probability 1/2 each."""
    batch, channels = 16, 512
    ours = np.asarray(complementary_dropout_mask(jax.random.key(0), batch, channels))
    theirs = _mask_numpy(batch, channels, seed=0)
    for mask in (ours, theirs):
        _check_mask_structure(mask, batch, channels)
        dropped = mask[: batch // 2][~np.all(mask[: batch // 2] == 1, axis=1)]
        # fraction of 2s ~ Binomial(n, 0.5) / n; 6 standard deviations
        assert abs(np.mean(dropped == 2) - 0.5) < 6 * 0.5 / np.sqrt(dropped.size)
    # kept pairs are a random subset: over keys every pair is sometimes kept, sometimes not
    kept = np.stack([np.all(np.asarray(complementary_dropout_mask(jax.random.key(s), 8, 4))[:4] == 1, axis=1)
                     for s in range(40)])
    assert np.all(kept.any(axis=0)) and np.all((~kept).any(axis=0))
    with pytest.raises(ValueError, match="odd"):
        complementary_dropout_mask(jax.random.key(0), 5, 4)


def test_mask_from_half_and_key_option(pair):
    _, ours, config = pair
    half = jnp.asarray([[0.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    mask = np.asarray(complementary_mask_from_half(half, jnp.asarray([False, True])))
    np.testing.assert_array_equal(mask, [[0, 2, 2], [1, 1, 1], [2, 0, 0], [1, 1, 1]])
    x = jnp.asarray(random_images(4, 98, 98, seed=5))
    key = jax.random.key(7)
    forward = nnx.jit(lambda m, a, **kw: m(a, **kw))
    by_key = forward(ours, x, comp_drop_key=key)
    by_mask = forward(ours, x, comp_drop_mask=complementary_dropout_mask(key, 4, config.embed_dim))
    np.testing.assert_array_equal(np.asarray(by_key), np.asarray(by_mask))
    with pytest.raises(ValueError, match="not both"):
        forward(ours, x, comp_drop_mask=jnp.ones((4, config.embed_dim)), comp_drop_key=key)
    with pytest.raises(ValueError, match="comp_drop_mask must be"):
        forward(ours, x, comp_drop_mask=jnp.ones((2, config.embed_dim)))


def test_gradients_with_complementary_dropout_fp32():
    """d(sum(logits * g))/d(params) through the final resize and the masks: every head parameter
    against V2's, and the gradient reaching the encoder (its parameters, stand-in names)."""
    ref, ours, config = stand_in_pair(HEAD, seed=5)
    ref.train()
    x = random_images(4, 98, 126, seed=6)
    mask = _mask_numpy(4, config.embed_dim, seed=7)
    g = np.random.default_rng(8).normal(size=(4, 98, 126, config.num_classes)).astype(np.float32)
    out = ref(nhwc_to_nchw(x), comp_drop=True, comp_drop_mask=torch.from_numpy(mask))
    (out.permute(0, 2, 3, 1) * torch.from_numpy(g)).sum().backward()
    ref_head = {k[len("head."):]: p.grad for k, p in ref.named_parameters() if k.startswith("head.") and
                p.grad is not None}
    expected, _ = convert_head(ref_head, HEAD, src="", dst="head.", source_name="reference grads")
    expected["backbone.proj_kernel"] = ref.backbone.proj.weight.grad.numpy().transpose(2, 3, 1, 0)
    for i, block in enumerate(ref.backbone.blocks):
        expected[f"backbone.kernels.{i}"] = block.weight.grad.numpy().T
        expected[f"backbone.biases.{i}"] = block.bias.grad.numpy()
    expected["backbone.proj_bias"] = ref.backbone.proj.bias.grad.numpy()

    def loss_fn(model, a, m, w):
        return jnp.sum(model(a, comp_drop_mask=m) * w)

    got = flat_grads(nnx.jit(nnx.grad(loss_fn))(ours, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(g)))
    assert set(got) == set(expected)
    for key, value in got.items():
        assert relative_error(value, expected[key]) <= FP32_TOL, (key, relative_error(value, expected[key]))


def test_lock_backbone_stops_encoder_gradients():
    _, free, _ = stand_in_pair(HEAD, seed=9)
    _, locked, config = stand_in_pair(HEAD, seed=9, lock_backbone=True)
    assert config.lock_backbone
    x = jnp.asarray(random_images(2, 98, 98, seed=10))

    def loss_fn(model, a):
        return jnp.sum(model(a) ** 2)

    grad_fn = nnx.jit(nnx.grad(loss_fn))
    grads_free = flat_grads(grad_fn(free, x))
    grads_locked = flat_grads(grad_fn(locked, x))
    labels = flat_grads(param_group_labels(nnx.state(locked, nnx.Param)))
    assert {k for k, v in labels.items() if v == "backbone"} == {k for k in grads_locked if k.startswith("backbone.")}
    for key in grads_free:
        if key.startswith("backbone."):
            assert np.any(grads_free[key] != 0) and np.all(grads_locked[key] == 0), key
        else:
            np.testing.assert_array_equal(grads_free[key], grads_locked[key])


def test_sharded_batch_matches_single_device(pair, num_devices):
    """Batch over P("data") on an 8-device mesh (masks sharded with it) equals the 1-device run."""
    _, ours, config = pair
    x = jnp.asarray(random_images(num_devices, 98, 126, seed=11))
    mask = complementary_dropout_mask(jax.random.key(3), num_devices, config.embed_dim)
    fn = nnx.jit(lambda m, a, k: m(a, comp_drop_mask=k))
    single = np.asarray(fn(ours, x, mask))
    mesh = Mesh(np.array(jax.devices()).reshape(num_devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    out = fn(ours, jax.device_put(x, sharding), jax.device_put(mask, sharding))
    assert out.sharding.spec[0] == "data"
    assert relative_error(out, single) <= 1e-6


def test_bf16_deviation():
    """The head in bf16 (fp32 parameters; the stand-in encoder stays fp32) within 1.5e-2 of fp32, relative
    to the largest logit. The whole model with DINOv2 in bf16: dinov2_model_parity_test.py."""
    _, ours16, _ = stand_in_pair(HEAD, seed=3, dtype=jnp.bfloat16)
    _, ours32, _ = stand_in_pair(HEAD, seed=3)
    x = jnp.asarray(random_images(2, 98, 126, seed=12))
    o16 = nnx.jit(lambda m, a: m(a))(ours16, x)
    o32 = nnx.jit(lambda m, a: m(a))(ours32, x)
    assert o16.dtype == jnp.float32
    err = relative_error(o16, o32)
    assert 0 < err <= 1.5e-2, err

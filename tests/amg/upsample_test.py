"""Banded upsampling of mask logits against the reference's two F.interpolate calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsp_jax.models.sam.transforms import resize_longest_side_shape
from zsp_jax.amg.upsample import Band, Resize2d, band_for_long_side, upsample_logits

_up = jax.jit(upsample_logits, static_argnums=(4, 5))


def _reference(low, input_hw, out_hw, size):
    x = F.interpolate(torch.from_numpy(low)[None], (size, size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(x, tuple(out_hw), mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("hw,offset", [((150, 200), (0, 0)), ((375, 500), (7, 3)), ((90, 61), (0, 11)),
                                       ((1200, 900), (0, 0)), ((40, 700), (5, 5))])
def test_equals_torch_interpolate(size, hw, offset):
    rng = np.random.default_rng(0)
    low = rng.standard_normal((3, size // 4, size // 4)).astype(np.float32)
    input_hw = resize_longest_side_shape(*hw, size)
    band = band_for_long_side(size, max(hw))
    plan = Resize2d(hw[0] + offset[0] + 5, hw[1] + offset[1] + 9, band, band)
    out, inside, ok = _up(jnp.asarray(low), jnp.asarray(input_hw), jnp.asarray(hw), jnp.asarray(offset), plan, size)
    out, inside = np.asarray(out), np.asarray(inside)
    assert bool(ok)
    ref = _reference(low, input_hw, hw, size)
    window = (slice(None), slice(offset[0], offset[0] + hw[0]), slice(offset[1], offset[1] + hw[1]))
    np.testing.assert_allclose(out[window], ref, atol=2e-6, rtol=0)
    assert inside.sum() == hw[0] * hw[1] and inside[window[1:]].all()
    assert np.all(out[:, ~inside] == 0)


def test_too_narrow_band_is_reported():
    low = jnp.ones((1, 64, 64))
    plan = Resize2d(40, 40, Band(64, 4), Band(64, 4))  # a 40-pixel image spans all 64 low-res samples
    _, _, ok = _up(low, jnp.asarray((256, 256)), jnp.asarray((40, 40)), jnp.zeros(2, jnp.int32), plan, 256)
    assert not bool(ok)

"""The bicubic resampling matrices against torch's F.interpolate (positional-embedding resizes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsp_jax.utils.resize import bicubic_scale_factor_matrix, resize_matrix, scale_factor_output_size

SIZES = [(14, 14, 28, 28), (7, 7, 28, 20), (24, 24, 32, 32), (14, 14, 7, 7), (16, 16, 5, 9), (20, 20, 13, 13),
         (3, 50, 11, 17), (14, 14, 14, 30)]


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_bicubic(size, antialias):
    hi, wi, ho, wo = size
    x = np.random.default_rng(0).standard_normal((1, 4, hi, wi))
    ref = F.interpolate(torch.tensor(x), size=(ho, wo), mode="bicubic", antialias=antialias,
                        align_corners=False).numpy()
    ours = np.einsum("ij,ncjk,lk->ncil", resize_matrix(hi, ho, antialias=antialias), x,
                     resize_matrix(wi, wo, antialias=antialias))
    assert np.abs(ours - ref).max() <= 1e-12 * np.abs(ref).max()


def test_kernels_differ():
    """The two modes are different functions even when upsampling (a=-0.5 vs a=-0.75 cubic)."""
    a = resize_matrix(14, 28, antialias=True)
    b = resize_matrix(14, 28, antialias=False)
    assert np.abs(a - b).max() > 1e-3
    assert np.allclose(a.sum(1), 1) and np.allclose(b.sum(1), 1)
    assert np.array_equal(resize_matrix(14, 14, antialias=True), np.eye(14))


# ------------------------------------------------------------------ scale_factor= calls (DINOv2's positional embedding)

# (input length, scale factor): DINOv2's (grid + 0.1) / 37 up and down, a square pretrain grid kept at 37 (37.1 / 37,
# not the identity), plain factors, and factors whose product is not an integer.
SCALE_CASES = [(37, 7.1 / 37), (37, 9.1 / 37), (37, 37.1 / 37), (37, 38.1 / 37), (37, 74.1 / 37), (37, 100.1 / 37),
               (16, 0.5), (16, 2.0), (5, 3.3), (24, 0.37), (37, 13 / 37)]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: f"{c[0]}x{c[1]:.4f}")
def test_scale_factor_matches_torch(case, antialias):
    """Output length and weights equal torch's F.interpolate(scale_factor=...) in float64, both axes, up and down."""
    n, s = case
    x = np.random.default_rng(1).standard_normal((1, 3, n, n + 3))
    s_w = s * 1.25
    ref = F.interpolate(torch.tensor(x), scale_factor=(s, s_w), mode="bicubic", align_corners=False,
                        antialias=antialias).numpy()
    mh = bicubic_scale_factor_matrix(n, s, antialias=antialias)
    mw = bicubic_scale_factor_matrix(n + 3, s_w, antialias=antialias)
    assert (mh.shape[0], mw.shape[0]) == ref.shape[2:]
    assert (scale_factor_output_size(n, s), scale_factor_output_size(n + 3, s_w)) == ref.shape[2:]
    ours = np.einsum("ij,ncjk,lk->ncil", mh, x, mw)
    assert np.abs(ours - ref).max() <= 1e-12 * np.abs(ref).max()


@pytest.mark.parametrize("antialias", [False, True])
def test_scale_factor_matches_torch_float32(antialias):
    """With float32 input (DINOv2 resizes the embedding in float32) torch computes coordinates in float32: ~1e-7."""
    x = np.random.default_rng(2).standard_normal((1, 8, 37, 37)).astype(np.float32)
    s_h, s_w = 7.1 / 37, 9.1 / 37
    ref = F.interpolate(torch.tensor(x), scale_factor=(s_h, s_w), mode="bicubic", align_corners=False,
                        antialias=antialias).numpy()
    ours = np.einsum("ij,ncjk,lk->ncil", bicubic_scale_factor_matrix(37, s_h, antialias=antialias), x,
                     bicubic_scale_factor_matrix(37, s_w, antialias=antialias))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_scale_factor_differs_from_size_call():
    """The scale_factor= call is a different function from size= with the same output length (why this exists)."""
    for grid in (7, 9, 37, 50):
        by_scale = bicubic_scale_factor_matrix(37, (grid + 0.1) / 37)
        assert by_scale.shape == (grid, 37)
        assert np.abs(by_scale - resize_matrix(37, grid, antialias=False)).max() > 1e-3
    # and torch's floor of in * s: 37 * (39 / 37) is 38.99999..., hence DINOv2's +0.1
    assert scale_factor_output_size(37, 39 / 37) == 38
    assert scale_factor_output_size(37, 39.1 / 37) == 39

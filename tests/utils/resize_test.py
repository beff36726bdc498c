"""The bicubic resampling matrices against torch's F.interpolate (positional-embedding resizes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsp_jax.utils.resize import resize_matrix

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

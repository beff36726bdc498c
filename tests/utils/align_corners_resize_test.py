"""Bilinear resize with align_corners=True against torch.nn.functional.interpolate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from zsp_jax.utils.resize import align_corners_matrix, resize_bilinear_align_corners
from zsp_jax.utils.bench import relative_error

SIZES = [
    ((21, 21), (81, 81)),     # ASPP output -> stride-4 features at 321
    ((81, 81), (321, 321)),   # logits -> input at 321
    ((321, 321), (21, 21)),   # down-sampling, odd sizes
    ((5, 7), (9, 4)),         # non-square, up in one axis and down in the other
    ((1, 1), (9, 6)),         # image pooling broadcast
    ((6, 9), (1, 1)),         # to a single pixel: the top-left input pixel
    ((2, 3), (3, 2)),
    ((33, 33), (33, 33)),     # identity
]


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_interpolate(src, dst, dtype):
    x = np.random.default_rng(0).normal(size=(2, 3, *src)).astype(dtype)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=True).numpy()
    with jax.enable_x64(dtype == np.float64):
        ours = np.asarray(jax.jit(resize_bilinear_align_corners, static_argnums=1)(
            jnp.asarray(x.transpose(0, 2, 3, 1)), dst)).transpose(0, 3, 1, 2)
    assert ours.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert relative_error(ours, ref) <= tol


def test_gradient_matches_torch():
    x = np.random.default_rng(1).normal(size=(1, 2, 7, 5)).astype(np.float32)
    g = np.random.default_rng(2).normal(size=(1, 2, 13, 11)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    (F.interpolate(xt, size=(13, 11), mode="bilinear", align_corners=True) * torch.from_numpy(g)).sum().backward()
    grad = jax.grad(lambda a: jnp.sum(resize_bilinear_align_corners(a, (13, 11)) * g.transpose(0, 2, 3, 1)))(
        jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert relative_error(np.asarray(grad).transpose(0, 3, 1, 2), xt.grad.numpy()) <= 1e-6


def test_matrix_rows_are_two_point_interpolations():
    m = align_corners_matrix(81, 21)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert ((m > 0).sum(1) <= 2).all()
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0  # corners are aligned

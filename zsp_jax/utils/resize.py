"""Resizes equal to PyTorch's and PIL's, as separable 1-D matrices (one module for every model family).

* ``resize_bilinear_align_corners``: ``F.interpolate(mode="bilinear", align_corners=True)`` on NHWC
  arrays (DeepLabV3+'s decoder and output, UniMatch V2's DPT head);
* ``bicubic_matrix`` / ``antialias_bicubic_matrix``: torch's bicubic with and without antialiasing
  (= PIL's BICUBIC), used as below.

Two places need a bicubic resize equal to the PyTorch reference to ~1e-7:

* the vision tower's positional embedding, resampled to the patch grid of another input size.
  open_clip / GEM call ``F.interpolate(mode="bicubic", antialias=True)``; transformers'
  ``interpolate_pos_encoding`` calls it with ``antialias=False, align_corners=False``;
* the GEM image transform (PIL ``Image.resize(..., BICUBIC)``), for the on-device variant.

``jax.image.resize(method="cubic")`` is neither: it uses the Keys kernel with a=-0.5 and its
own antialiasing rule, whereas torch's plain bicubic uses a=-0.75 with edge replication, and
torch's antialiased path (ported from PIL) uses a=-0.5 with a support that widens by the
downscale factor and weights renormalised at the borders. We therefore build the resize as two
small matrices on the host with numpy (float64) and apply them with an einsum. Shapes are static
per input size, so the matrices are compile-time constants of the jitted program.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def antialias_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch's ``bicubic, antialias=True`` and PIL's BICUBIC.

    The filter is the a=-0.5 cubic; when downscaling its support grows by ``in/out`` (a
    low-pass); taps falling outside the input are dropped and the rest renormalised to sum 1.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as in C
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch's ``bicubic, antialias=False, align_corners=False``.

    Four taps of the a=-0.75 cubic around ``scale * (i + 0.5) - 0.5``, indices clamped to the
    border (edge replication), no renormalisation.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            idx = min(max(x0 + k, 0), in_size - 1)
            m[i, idx] += _cubic(np.asarray(t - k), -0.75)
    return m


def resize_matrix(in_size: int, out_size: int, *, antialias: bool) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of one axis of torch's bicubic resize."""
    if in_size == out_size:
        return np.eye(in_size)
    return antialias_bicubic_matrix(in_size, out_size) if antialias else bicubic_matrix(in_size, out_size)


@functools.lru_cache(maxsize=256)
def align_corners_matrix(out_size: int, in_size: int, dtype: str = "float32") -> np.ndarray:
    """(out_size, in_size) matrix of 1-D linear interpolation with ``align_corners=True``.

    Output i samples input position ``i * (in - 1) / (out - 1)`` (0 when either size is 1),
    computed in ``dtype`` (fp32, or fp64 for fp64 inputs) as PyTorch does; each row has weights
    ``1 - t`` and ``t`` on the two neighbours, so rows sum to 1.
    """
    ft = np.dtype(dtype).type
    w = np.zeros((out_size, in_size), ft)
    if out_size == 1 or in_size == 1:
        w[:, 0] = 1.0
        return w
    scale = ft((in_size - 1) / (out_size - 1))
    src = np.arange(out_size, dtype=ft) * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    t = (src - i0.astype(ft)).astype(ft)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), 1.0 - t)
    np.add.at(w, (rows, i1), t)
    return w


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` for NHWC ``x``.

    ``jax.image.resize`` samples at half-pixel centres (align_corners=False) and has no
    align-corners mode, so the resize is done as two small dense interpolation matrices,
    built on the host from the static shapes, applied with ``einsum`` (up- and down-sampling
    alike, no antialiasing, as PyTorch). Matmuls map onto the MXU/tensor cores, and their
    gradients are matmuls too (a gather would give a scatter-add in the backward pass).

    Args:
      x: (B, H, W, C) float.
      size: (H_out, W_out) static.

    Returns:
      (B, H_out, W_out, C), x's dtype.
    """
    h, w = x.shape[1:3]
    oh, ow = size
    if (oh, ow) == (h, w):
        return x
    if (h, w) == (1, 1):
        return jnp.broadcast_to(x, (x.shape[0], oh, ow, x.shape[3]))
    exact = "float64" if x.dtype == jnp.float64 else "float32"
    mh = jnp.asarray(align_corners_matrix(oh, h, exact), x.dtype)
    mw = jnp.asarray(align_corners_matrix(ow, w, exact), x.dtype)
    # contract the axis that shrinks the intermediate most first
    if oh * w <= h * ow:
        y = jnp.einsum("oh,bhwc->bowc", mh, x)
        return jnp.einsum("pw,bowc->bopc", mw, y)
    y = jnp.einsum("pw,bhwc->bhpc", mw, x)
    return jnp.einsum("oh,bhpc->bopc", mh, y)

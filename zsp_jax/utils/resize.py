"""Resizes equal to PyTorch's and PIL's, as separable 1-D matrices (one module for every model family).

* ``resize_bilinear_align_corners``: ``F.interpolate(mode="bilinear", align_corners=True)`` on NHWC
  arrays (DeepLabV3+'s decoder and output, UniMatch V2's DPT head);
* ``bicubic_matrix`` / ``antialias_bicubic_matrix``: torch's bicubic with and without antialiasing
  (= PIL's BICUBIC), used as below;
* ``bicubic_scale_factor_matrix``: torch's bicubic called with ``scale_factor=`` instead of ``size=``
  (output length and coordinate rule differ), DINOv2's positional-embedding resize;
* ``bilinear_taps`` / ``bilinear_taps_np``: the two taps and weights of torch's bilinear
  (``align_corners=False``) per output pixel, with traced or static lengths (SAM's mask
  upsampling in ``zsp_jax.amg.upsample``, the labeller's feature pooling);
* ``resize_nearest``: PIL's nearest-neighbour resize of label maps and masks (host).

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


def scale_factor_output_size(in_size: int, scale_factor: float) -> int:
    """The output length torch gives ``F.interpolate(..., scale_factor=s)``: floor(in_size * s) in float64.

    (DINOv2 adds 0.1 to its target grid before dividing, because e.g. 37 * (39 / 37) rounds to
    38.99999..., which floors to 38.)
    """
    return math.floor(float(in_size) * float(scale_factor))


@functools.lru_cache(maxsize=64)
def bicubic_scale_factor_matrix(in_size: int, scale_factor: float, *, antialias: bool = False) -> np.ndarray:
    """(out, in_size) float64 weights of ``F.interpolate(scale_factor=s, mode="bicubic", align_corners=False)``.

    When given a scale factor (and ``recompute_scale_factor`` left unset) torch does not map
    output to input coordinates with ``in / out`` (what ``bicubic_matrix`` uses, the ``size=``
    call) but with ``1 / s``: output ``i`` samples input position ``(i + 0.5) / s - 0.5``. The
    output length is ``scale_factor_output_size(in_size, s)``. The two calls differ whenever
    ``in * s`` is not an integer, e.g. DINOv2's ``s = (grid + 0.1) / 37``.

    Args:
      in_size: input length (>= 1).
      scale_factor: s > 0, as passed to ``F.interpolate`` (a Python float, i.e. float64).
      antialias: False: torch's plain bicubic (a=-0.75 cubic, four taps, edge replication, no
        renormalisation), as ``bicubic_matrix``. True: the antialiased kernel (a=-0.5 cubic
        whose support widens by ``1 / s`` when shrinking, taps outside the input dropped and the
        rest renormalised), as ``antialias_bicubic_matrix``; torch's antialiased kernel skips an
        axis whose output length equals its input length, so that case is the identity.

    Returns:
      (out, in_size) float64; ``out @ x`` resamples a length-``in_size`` signal along axis 0.
    """
    out_size = scale_factor_output_size(in_size, scale_factor)
    if out_size < 1:
        raise ValueError(f"scale_factor {scale_factor} gives an empty output for input length {in_size}")
    inv_scale = 1.0 / float(scale_factor)  # torch: area_pixel_compute_scale with a given scale
    m = np.zeros((out_size, in_size), np.float64)
    if antialias:
        if out_size == in_size:
            return np.eye(in_size)
        support = 2.0 * inv_scale if inv_scale >= 1.0 else 2.0
        stretch = 1.0 / inv_scale if inv_scale >= 1.0 else 1.0
        for i in range(out_size):
            center = inv_scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as in C
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) * stretch, -0.5)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
        return m
    for i in range(out_size):
        src = inv_scale * (i + 0.5) - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), in_size - 1)] += _cubic(np.asarray(t - k), -0.75)
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


def bilinear_taps_np(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Static taps of torch's ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis.

    Output pixel ``i`` reads inputs ``i0[i]`` and ``i1[i]`` with weights ``w0[i]`` and ``w1[i]``,
    computed in float32 as torch's CPU kernel does: ``src = max(scale * (i + 0.5) - 0.5, 0)`` with
    ``scale = in_len / out_len``, ``i0 = floor(src)``, the right neighbour clamped at the edge.

    Returns:
      (i0, i1) (out_len,) int32 and (w0, w1) (out_len,) float32.
    """
    scale = np.float32(in_len) / np.float32(out_len)
    dst = np.arange(out_len, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = src.astype(np.int32)
    i1 = i0 + (i0 < in_len - 1).astype(np.int32)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def bilinear_taps(in_len: Array, out_len: Array, n_out: int) -> tuple[Array, Array, Array, Array]:
    """``bilinear_taps_np`` with traced lengths (one compiled program for many sizes), jittable.

    Args:
      in_len, out_len: () int32 input and output lengths of the resize.
      n_out: static number of output positions to compute (0..n_out-1; positions at or beyond
        ``out_len`` continue the same formula and are the caller's to mask).

    Returns:
      (i0, i1) (n_out,) int32 (clamped into the input) and (w0, w1) (n_out,) float32.
    """
    scale = in_len.astype(jnp.float32) / out_len.astype(jnp.float32)
    dst = jnp.arange(n_out, dtype=jnp.float32)
    src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    i0 = src.astype(jnp.int32)
    i0 = jnp.minimum(i0, jnp.maximum(in_len - 1, 0))
    i1 = i0 + (i0 < in_len - 1).astype(jnp.int32)
    w1 = src - i0.astype(jnp.float32)
    return i0, i1, 1.0 - w1, w1


def resize_nearest(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL's nearest-neighbour resize of a label-like (H, W) or (H, W, C) uint8 array to ``hw`` (host).

    PIL's NEAREST picks source pixel ``floor((i + 0.5) * in / out)``, which is what every label
    map, confidence map and mask of the labeller is resized with (their values are classes or
    scores, never interpolated). Returns ``array`` itself when it already has the size.
    """
    from PIL import Image

    if array.shape[:2] == tuple(hw):
        return array
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((int(hw[1]), int(hw[0])), Image.NEAREST))

"""Separable 1-D resampling matrices that reproduce torch's and PIL's bicubic resize exactly.

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

import numpy as np


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

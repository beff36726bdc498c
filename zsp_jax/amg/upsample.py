"""Low-resolution mask logits -> full-resolution logits, as segment-anything's postprocess_masks.

The reference upsamples the decoder's (S/4)^2 logits bilinearly (``align_corners=False``) to the
S x S input canvas, crops the valid (h', w') part and resizes bilinearly again to the crop's
original (H, W) size. Both steps are separable linear maps, so along each axis their
composition maps an output pixel to at most 4 low-resolution samples. We apply that composed
map directly, which never builds the S x S intermediate:

* along each axis the 4-tap map is written as a **banded matrix**, cut into blocks of ``block``
  output pixels that each read a window of ``window`` consecutive low-resolution samples; a
  block is one small dense matrix, so the resize is a batched matrix product instead of a
  gather (slow in XLA on CPU; only CPU is measured so far);
* all sizes (h', w', H, W and the crop's offset in the image) are traced values, so one
  compiled program serves every image of a size bucket; the window is static, derived from a
  lower bound on the crop's long side (``Bucket``), and every call checks that the taps fit
  (``ok``), which the host wrapper turns into an error.

Sample positions and weights follow torch's CPU kernel (``zsp_jax.utils.resize.bilinear_taps``), so the
result equals the reference up to float32 rounding of the composed weights (about 1e-7
relative), which moves a thresholded mask only where a logit is within that distance of the
threshold.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zsp_jax.utils.resize import bilinear_taps, bilinear_taps_np


def composed_taps(low: int, size: int, input_len: jax.Array, out_len: jax.Array, offset: jax.Array,
                  n_out: int, stride: int = 1) -> tuple[jax.Array, jax.Array]:
    """4-tap map of one axis: low-res (``low``) -> canvas ``size`` -> crop ``input_len`` -> ``out_len``.

    Args:
      low: static low-resolution length (S/4).
      size: static canvas length S.
      input_len: traced valid length h' of the canvas (the resized crop).
      out_len: traced output length H (the crop's original length).
      offset: traced position of output pixel 0 in the output canvas (the crop's x0 or y0 when
        pasting into the image frame, else 0).
      n_out: static output canvas length; pixels outside [offset, offset + out_len) get zero weights.
      stride: static; output sample i is pixel ``i * stride`` (a subsampled output grid).

    Returns:
      idx (n_out, 4) int32 low-res indices and w (n_out, 4) float32 weights.
    """
    a0, a1, u0, u1 = (jnp.asarray(t) for t in bilinear_taps_np(low, size))
    local = jnp.arange(n_out, dtype=jnp.int32) * stride - offset
    inside = (local >= 0) & (local < out_len)
    b0, b1, v0, v1 = bilinear_taps(input_len, out_len, n_out * stride)
    take = lambda t, i: t[jnp.clip(i, 0, size - 1)]  # noqa: E731
    pos = jnp.clip(local, 0, n_out * stride - 1)
    b0, b1, v0, v1 = b0[pos], b1[pos], v0[pos], v1[pos]
    idx = jnp.stack([take(a0, b0), take(a1, b0), take(a0, b1), take(a1, b1)], axis=-1)
    w = jnp.stack([v0 * take(u0, b0), v0 * take(u1, b0), v1 * take(u0, b1), v1 * take(u1, b1)], axis=-1)
    w = jnp.where(inside[:, None], w, 0.0)
    idx = jnp.where(inside[:, None], idx, -1)
    return idx, w


@dataclasses.dataclass(frozen=True)
class Band:
    """Static blocking of one axis: ``block`` output pixels read ``window`` consecutive inputs."""

    block: int
    window: int

    @classmethod
    def for_ratio(cls, low: int, max_ratio: float, block: int = 64) -> "Band":
        """The band for a canvas -> output ratio of at most ``max_ratio`` (h'/H)."""
        window = int(math.ceil(((block - 1) * max_ratio + 2) / 4)) + 4
        window = min(low, -(-window // 4) * 4)
        return cls(block, window)


def band_for_long_side(image_size: int, min_long_side: int, block: int = 64, stride: int = 1) -> Band:
    """The band that covers every crop whose longer side is >= ``min_long_side`` pixels.

    h'/H = (S / long side) up to the +0.5 rounding of the resized length, hence the + 0.5; an
    output grid subsampled by ``stride`` advances ``stride`` times faster.
    """
    return Band.for_ratio(image_size // 4, stride * (image_size / max(1, min_long_side) + 0.5), block)


def band_matrices(idx: jax.Array, w: jax.Array, low: int, band: Band) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cuts a 4-tap map into blocks.

    Args:
      idx, w: (n_out, 4) from ``composed_taps``; n_out must be a multiple of ``band.block``.

    Returns:
      starts (G,) int32 first input sample of each block's window, mats (G, block, window)
      float32, ok () bool (every nonzero tap lies inside its block's window).
    """
    n_out = idx.shape[0]
    g = n_out // band.block
    idx_b = idx.reshape(g, band.block, 4)
    w_b = w.reshape(g, band.block, 4)
    used = w_b != 0.0
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(used, idx_b, big), axis=(1, 2))
    starts = jnp.clip(jnp.where(first == big, 0, first), 0, low - band.window).astype(jnp.int32)
    local = idx_b - starts[:, None, None]
    ok = jnp.all(~used | ((local >= 0) & (local < band.window)))
    onehot = (local[..., None] == jnp.arange(band.window)) & used[..., None]
    mats = jnp.sum(jnp.where(onehot, w_b[..., None], 0.0), axis=2)
    return starts, mats, ok


def apply_band(x: jax.Array, starts: jax.Array, mats: jax.Array) -> jax.Array:
    """Resizes axis -2 of ``x`` (..., low, C) with a blocked band -> (..., G * block, C)."""
    g, block, window = mats.shape
    rows = starts[:, None] + jnp.arange(window)  # (G, window)
    windows = jnp.take(x, rows.reshape(-1), axis=-2, mode="clip")  # (..., G * window, C)
    windows = windows.reshape(x.shape[:-2] + (g, window, x.shape[-1]))
    y = jnp.einsum("gow,...gwc->...goc", mats, windows.astype(jnp.float32))
    return y.reshape(x.shape[:-2] + (g * block, x.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Resize2d:
    """A static resize plan: canvas (height, width) of the output, the band of each axis, and the
    output stride (1: every pixel; s: every s-th pixel of each axis, the canvas then counts samples)."""

    height: int
    width: int
    band_y: Band
    band_x: Band
    stride: int = 1

    def padded(self) -> tuple[int, int]:
        return (-(-self.height // self.band_y.block) * self.band_y.block,
                -(-self.width // self.band_x.block) * self.band_x.block)


def upsample_logits(low_res: jax.Array, input_hw: jax.Array, out_hw: jax.Array, offset_yx: jax.Array,
                    plan: Resize2d, image_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reference-equal upsampling of mask logits into a static canvas.

    Args:
      low_res: (N, s, s) float logits, s = image_size / 4, of ONE crop.
      input_hw: (2,) int32 (h', w'), the resized crop inside the S x S encoder input.
      out_hw: (2,) int32 (H, W), the crop's size in original pixels.
      offset_yx: (2,) int32, where the crop's pixel (0, 0) lands in the canvas.
      plan: static canvas size and bands.
      image_size: static S.

    Returns:
      logits (N, plan.height, plan.width) float32 (0 outside the crop; with a stride, sample (i, j) is
      pixel (i * stride, j * stride)), inside (plan.height, plan.width) bool (the crop's pixels),
      ok () bool (the bands covered every tap).
    """
    s = low_res.shape[-1]
    hp, wp = plan.padded()
    iy, wy = composed_taps(s, image_size, input_hw[0], out_hw[0], offset_yx[0], hp, plan.stride)
    ix, wx = composed_taps(s, image_size, input_hw[1], out_hw[1], offset_yx[1], wp, plan.stride)
    sy, my, oky = band_matrices(iy, wy, s, plan.band_y)
    sx, mx, okx = band_matrices(ix, wx, s, plan.band_x)
    t = apply_band(jnp.swapaxes(low_res, -1, -2), sx, mx)  # (N, Wp, s)
    out = apply_band(jnp.swapaxes(t, -1, -2), sy, my)  # (N, Hp, Wp)
    out = out[..., : plan.height, : plan.width]
    rows = jnp.arange(plan.height) * plan.stride - offset_yx[0]
    cols = jnp.arange(plan.width) * plan.stride - offset_yx[1]
    inside = (((rows >= 0) & (rows < out_hw[0]))[:, None]) & (((cols >= 0) & (cols < out_hw[1]))[None, :])
    return out, inside, oky & okx

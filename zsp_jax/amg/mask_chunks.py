"""The kept masks at full resolution, a few at a time: what the generator returns and the labeller pools.

``scan_mask_chunks`` upsamples the low-resolution logits of the kept masks into the image canvas
``plan.mask_chunk`` masks at a time and hands each chunk's boolean masks to a fold function, so
the float32 logits exist for one chunk only ((B, chunk, Hb, Wb), not (B, K, Hb, Wb)), which
bounds the memory of large images. Chunks whose slots are all empty are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from zsp_jax.amg.plan import Plan, largest_divisor
from zsp_jax.amg.upsample import upsample_logits


def scan_mask_chunks(fn: Callable[[Any, jax.Array, jax.Array], tuple[Any, Any]], carry: Any, low: jax.Array,
                     input_hw: jax.Array, crop_box: jax.Array, image_hw: jax.Array, plan: Plan,
                     valid: jax.Array | None = None) -> tuple[Any, Any, jax.Array]:
    """B images' kept masks at full resolution, ``plan.mask_chunk`` slots at a time, folded with ``fn``.

    A chunk whose slots are invalid in every image is skipped (``lax.cond``: the carry is kept, its
    outputs are zeros), so the cost follows the number of kept masks, not ``max_masks``.

    Args:
      fn: ``fn(carry, masks (B, chunk, Hb, Wb) bool, slots (chunk,) int32) -> (carry, out)``.
      carry: initial carry.
      low: (B, K, s, s) low-resolution logits of the kept masks (in their crops' encoder frames).
      input_hw, crop_box: (B, K, 2) / (B, K, 4) int32 per mask (``AmgOutputs``).
      image_hw: (B, 2) int32; pixels outside an image are False.
      plan: static shapes (``plan.final`` canvas, ``plan.mask_chunk``).
      valid: optional (B, K) bool (default: all valid).

    Returns:
      (final carry, outs stacked over chunks (K // chunk, ...), ok (B, K) bool: the bands covered every
      tap of each mask's resize; only meaningful for valid slots).
    """
    o = plan.options
    b, k = low.shape[:2]
    c = largest_divisor(k, plan.mask_chunk)
    crop_hw = jnp.stack([crop_box[..., 3] - crop_box[..., 1], crop_box[..., 2] - crop_box[..., 0]], axis=-1)
    offset = jnp.stack([crop_box[..., 1], crop_box[..., 0]], axis=-1)
    rows = jnp.arange(plan.bucket.height)
    cols = jnp.arange(plan.bucket.width)

    def one_mask(lo, ih, ch, off, hw):
        logits, inside, ok = upsample_logits(lo[None], ih, ch, off, plan.final, plan.image_size)
        image_inside = (rows < hw[0])[:, None] & (cols < hw[1])[None, :]
        return (logits[0] > o.mask_threshold) & inside & image_inside, ok

    per_slot = jax.vmap(one_mask, in_axes=(0, 0, 0, 0, None))
    per_image = jax.vmap(per_slot)

    def compute(carry, xs):
        lo, ih, ch, off, idx, _ = xs
        m, ok = per_image(lo, ih, ch, off, image_hw)
        carry, out = fn(carry, m, idx)
        return carry, (out, ok)

    chunked = lambda a: jnp.moveaxis(a.reshape((b, k // c, c) + a.shape[2:]), 1, 0)  # noqa: E731
    valid = jnp.ones((b, k), bool) if valid is None else valid
    xs = tuple(map(chunked, (low, input_hw, crop_hw, offset, valid)))
    xs = xs[:4] + (jnp.arange(k, dtype=jnp.int32).reshape(k // c, c), xs[4])
    out_shapes = jax.eval_shape(compute, carry, jax.tree.map(lambda a: a[0], xs))[1]

    def skip(args):
        return args[0], jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype) if a.dtype == jnp.bool_
                                     else jnp.zeros(a.shape, a.dtype), out_shapes)

    def step(carry, xs):
        return jax.lax.cond(jnp.any(xs[5]), lambda args: compute(*args), skip, (carry, xs))

    carry, (outs, oks) = jax.lax.scan(step, carry, xs)
    return carry, outs, jnp.moveaxis(oks, 0, 1).reshape(b, k)

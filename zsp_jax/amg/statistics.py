"""Per-candidate statistics of the mask generator: stability scores, tight boxes, the crop-edge rule.

segment-anything computes, for every candidate that passes the predicted-IoU filter, its
full-resolution logits (``postprocess_masks``), the stability score (the ratio of the pixel counts
above ``mask_threshold + offset`` and above ``mask_threshold - offset``), the binary mask and its
tight box. Here the full-resolution logits of a few candidates at a time are produced by the
banded upsampling (``zsp_jax.amg.upsample``) and reduced at once to the two counts and the rows /
columns the mask occupies (XLA fuses the comparisons and reductions into one pass over the
logits); the binary masks themselves are never stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zsp_jax.amg.plan import LayerPlan, Plan
from zsp_jax.amg.upsample import upsample_logits

EDGE_ATOL = 20.0  # segment-anything's is_box_near_crop_edge tolerance, in pixels


def box_from_any(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """(..., H) and (..., W) bool occupancy -> (..., 4) int32 XYXY, max inclusive; empty -> 0."""
    def first_last(a):
        n = a.shape[-1]
        idx = jnp.arange(n, dtype=jnp.int32)
        first = jnp.min(jnp.where(a, idx, n), axis=-1)
        last = jnp.max(jnp.where(a, idx, -1), axis=-1)
        return first, last

    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    box = jnp.stack([x0, y0, x1, y1], axis=-1)
    empty = (x1 < x0) | (y1 < y0)
    return jnp.where(empty[..., None], 0, box).astype(jnp.int32)


def candidate_statistics(low: jax.Array, input_hw: jax.Array, crop_hw: jax.Array, layer: LayerPlan, plan: Plan
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stability scores and tight boxes of N candidate masks of one crop.

    In exact mode every pixel is evaluated, as the reference does. In fast mode only every
    ``fast_stride``-th pixel of each axis: the stability score becomes an estimate from that
    sample, and box edges are the outermost sampled set pixels (up to fast_stride - 1 pixels
    inside the true box).

    Args:
      low: (N, s, s) low-resolution logits; input_hw, crop_hw: (2,) int32.

    Returns:
      stability (N,) float32, boxes (N, 4) int32 in the crop frame, ok () bool.
    """
    o = plan.options
    res = layer.stats
    logits, inside, ok = upsample_logits(low, input_hw, crop_hw, jnp.zeros(2, jnp.int32), res, plan.image_size)
    logits = jnp.where(inside, logits, -jnp.inf)
    hi = jnp.sum(logits > o.mask_threshold + o.stability_score_offset, axis=(1, 2), dtype=jnp.int32)
    lo = jnp.sum(logits > o.mask_threshold - o.stability_score_offset, axis=(1, 2), dtype=jnp.int32)
    mask = logits > o.mask_threshold
    boxes = box_from_any(jnp.any(mask, axis=2), jnp.any(mask, axis=1)) * res.stride
    return hi.astype(jnp.float32) / lo.astype(jnp.float32), boxes, ok


def near_crop_edge(boxes: jax.Array, crop_box: jax.Array, image_hw: jax.Array) -> jax.Array:
    """segment-anything's ``is_box_near_crop_edge``: near an edge of the crop that is not an image edge.

    Args:
      boxes: (N, 4) int XYXY in the crop frame.
      crop_box: (4,) int XYXY of the crop in the image frame.
      image_hw: (2,) int (H, W).

    Returns:
      (N,) bool.
    """
    full = boxes.astype(jnp.float32) + jnp.stack([crop_box[0], crop_box[1], crop_box[0], crop_box[1]]
                                                 ).astype(jnp.float32)
    image_box = jnp.stack([0, 0, image_hw[1], image_hw[0]]).astype(jnp.float32)
    near_crop = jnp.abs(full - crop_box.astype(jnp.float32)) <= EDGE_ATOL
    near_image = jnp.abs(full - image_box) <= EDGE_ATOL
    return jnp.any(near_crop & ~near_image, axis=-1)

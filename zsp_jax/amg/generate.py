"""The jit-compiled, static-shape automatic mask generator: a batch of images in, padded arrays out.

``generate_padded`` runs every step of segment-anything's ``SamAutomaticMaskGenerator._generate_masks``
on device for B images at once, with no host round trip:

for each crop layer (a Python loop; layer i has its own static grid and crop canvas) and each crop
of the layer (``lax.map``): one encoder pass over the B crop inputs, then a ``lax.scan`` over
point batches that decodes 3 masks per point (``decode_candidates``) and keeps their
low-resolution logits and predicted IoUs. The predicted-IoU filter comes next
(``filter_candidates``): the candidates that pass are moved to the front and their full-resolution
logits are produced a few at a time (chunks without a surviving candidate are skipped with
``lax.cond``, so the cost follows the number of survivors, like the reference's), giving stability
scores and tight boxes; fast mode evaluates only every ``fast_stride``-th pixel of each axis.
Then the stability filter, the crop-edge filter and the box NMS, and the first ``max_masks``
survivors are kept. Across crops, the reference's NMS that prefers smaller crops; finally the kept
masks are upsampled into the image canvas (``zsp_jax.amg.mask_chunks``).

Everything has static shapes: ``max_masks`` outputs per image with a validity flag, and counts
that tell the host when more masks survived than fit (it then warns).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zsp_jax.amg.decoder import PromptDecoder
from zsp_jax.amg.inputs import AmgInputs, encoder_input
from zsp_jax.amg.mask_chunks import scan_mask_chunks
from zsp_jax.amg.nms import nms_padded
from zsp_jax.amg.plan import LayerPlan, Plan
from zsp_jax.amg.statistics import box_from_any, candidate_statistics, near_crop_edge


class AmgOutputs(NamedTuple):
    """Per image, the kept masks padded to K = max_masks, in the reference's output order.

    Attributes:
      masks: (B, K, Hb, Wb) bool full-resolution masks in the bucket canvas (pixels outside the
        image are False), or None when not requested.
      low_res_logits: (B, K, S/4, S/4) float32 decoder logits of each kept mask (in its crop's
        encoder frame), or None when not requested.
      boxes: (B, K, 4) int32 XYXY tight boxes in the image frame (max coordinates inclusive, as the
        reference's ``batched_mask_to_box``).
      predicted_iou, stability_score: (B, K) float32.
      area: (B, K) int32 mask areas (0 when masks were not requested).
      point_index: (B, K) int32 index into the layer's point grid.
      layer, crop_index: (B, K) int32 crop layer and crop within the layer.
      crop_box: (B, K, 4) int32 XYXY.
      input_hw: (B, K, 2) int32 size of the mask's resized crop inside the encoder input (what
        ``upsample_logits`` needs to bring ``low_res_logits`` to image resolution).
      valid: (B, K) bool; the first ``min(num_kept, K)`` entries are valid.
      num_kept: (B,) int32 masks that survived (capped at K + 1; > K means truncated).
      num_survived: (B,) int32 masks that survived the last NMS, not capped: how large ``max_masks``
        would have to be to keep them all (with crop layers, of the at most K per crop that
        reached the cross-crop NMS).
      truncated_crops: (B,) int32 crops whose within-crop NMS kept more than K masks.
      resize_ok: (B,) bool; False if an image did not fit its bucket's static resize bands.
    """

    masks: jax.Array | None
    low_res_logits: jax.Array | None
    boxes: jax.Array
    predicted_iou: jax.Array
    stability_score: jax.Array
    area: jax.Array
    point_index: jax.Array
    layer: jax.Array
    crop_index: jax.Array
    crop_box: jax.Array
    input_hw: jax.Array
    valid: jax.Array
    num_kept: jax.Array
    num_survived: jax.Array
    truncated_crops: jax.Array
    resize_ok: jax.Array


def crop_hw_of(crop_box: jax.Array) -> jax.Array:
    """(..., 4) XYXY crop boxes -> (..., 2) int32 (height, width)."""
    return jnp.stack([crop_box[..., 3] - crop_box[..., 1], crop_box[..., 2] - crop_box[..., 0]], axis=-1)


def decode_candidates(decoder: PromptDecoder, context: Any, grid: jax.Array, crop_box: jax.Array,
                      input_hw: jax.Array, layer: LayerPlan, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """Every point of one crop's grid decoded into 3 candidate masks, ``layer.batch`` points per step.

    Args:
      decoder, context: the prompt decoder and its ``image_context`` of the B crops' embeddings.
      grid: (P, 2) float32 normalised (x, y) points of the layer (padded to ``layer.n_padded``).
      crop_box, input_hw: (B, 4) / (B, 2) int32 of the crop in each image.

    Returns:
      low-res logits (n_batches, B, batch, 3, s, s) float32 (those of candidates the predicted-IoU
      filter drops may be 0) and predicted IoUs (B, 3 * P) float32, candidate 3p + m = mask m of
      point p.
    """
    o = plan.options
    b = crop_box.shape[0]
    n_batches = layer.n_padded // layer.batch
    crop_wh = crop_hw_of(crop_box)[:, ::-1].astype(jnp.float32)
    in_wh = input_hw[:, ::-1].astype(jnp.float32)
    # Points in crop pixels, then in the resized-input frame (ResizeLongestSide.apply_coords).
    points = (grid[None] * crop_wh[:, None]) * (in_wh / crop_wh)[:, None]  # (B, P, 2)
    points = points.reshape(b, n_batches, layer.batch, 2).transpose(1, 0, 2, 3)
    threshold = o.pred_iou_thresh if o.pred_iou_thresh > 0.0 else None

    def decode_batch(_, pts):
        low, iou = decoder.decode(context, pts, threshold)
        return None, (low.astype(jnp.float32), iou.astype(jnp.float32))

    _, (low_all, iou_all) = jax.lax.scan(decode_batch, None, points)  # (nb, B, batch, 3, s, s), (nb, B, batch, 3)
    return low_all, iou_all.transpose(1, 0, 2, 3).reshape(b, layer.n_candidates)


def gather_candidates(low_all: jax.Array, candidates: jax.Array) -> jax.Array:
    """Low-res logits of ``candidates`` (B, ...) int32 indices from ``decode_candidates``' stack -> (B, ..., s, s)."""
    batch = low_all.shape[2]
    images = jnp.arange(low_all.shape[1]).reshape((-1,) + (1,) * (candidates.ndim - 1))
    point, mask = candidates // 3, candidates % 3
    return low_all[point // batch, images, point % batch, mask]


def filter_candidates(low_all: jax.Array, iou: jax.Array, grid_valid: jax.Array, crop_box: jax.Array,
                      input_hw: jax.Array, image_hw: jax.Array, layer: LayerPlan, plan: Plan
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The reference's filters on one crop's candidates: predicted IoU, stability, crop edge.

    Statistics (full-resolution logits) are computed only where the reference computes them, for
    the candidates that pass the predicted-IoU filter: those are moved to the front (stable order)
    and evaluated ``layer.stats_chunk`` at a time; a chunk with no such candidate in any image is
    skipped.

    Args:
      low_all, iou: from ``decode_candidates``.
      grid_valid: (P,) bool real (not padding) points.
      crop_box, input_hw, image_hw: (B, 4) / (B, 2) / (B, 2) int32.

    Returns:
      keep (B, M) bool, stability (B, M) float32, boxes (B, M, 4) int32 in the crop frame (both 0
      where not computed), resize_ok (B,) bool.
    """
    o = plan.options
    b, m = iou.shape
    chunk = layer.stats_chunk
    keep = jnp.broadcast_to(grid_valid[jnp.arange(m) // 3], (b, m))
    if o.pred_iou_thresh > 0.0:
        keep = keep & (iou > o.pred_iou_thresh)
    crop_hw = crop_hw_of(crop_box)
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)  # (B, M)
    n_chunks = m // chunk
    order_c = order.reshape(b, n_chunks, chunk).transpose(1, 0, 2)
    keep_c = jnp.take_along_axis(keep, order, axis=1).reshape(b, n_chunks, chunk).transpose(1, 0, 2)
    per_image = jax.vmap(lambda low, ih, ch: candidate_statistics(low, ih, ch, layer, plan))

    def stats_chunk(_, xs):
        candidates, any_kept = xs
        return None, jax.lax.cond(
            jnp.any(any_kept),
            lambda c: per_image(gather_candidates(low_all, c), input_hw, crop_hw),
            lambda c: (jnp.zeros((b, chunk), jnp.float32), jnp.zeros((b, chunk, 4), jnp.int32), jnp.ones((b,), bool)),
            candidates)

    _, (stab_c, box_c, ok_c) = jax.lax.scan(stats_chunk, None, (order_c, keep_c))
    inverse = jnp.argsort(order, axis=1)
    stability = jnp.take_along_axis(stab_c.transpose(1, 0, 2).reshape(b, m), inverse, axis=1)
    boxes = jnp.take_along_axis(box_c.transpose(1, 0, 2, 3).reshape(b, m, 4), inverse[..., None], axis=1)
    if o.stability_score_thresh > 0.0:
        keep = keep & (stability >= o.stability_score_thresh)
    keep = keep & ~jax.vmap(near_crop_edge)(boxes, crop_box, image_hw)
    return keep, stability, boxes, jnp.all(ok_c, axis=0)


def _process_crop(decoder: PromptDecoder, embed: Callable[[jax.Array], jax.Array], images: jax.Array,
                  crop_box: jax.Array, input_hw: jax.Array, image_hw: jax.Array, grid: jax.Array,
                  grid_valid: jax.Array, layer: LayerPlan, plan: Plan, last_nms: bool) -> dict[str, jax.Array]:
    """One crop of B images -> its (B, K) NMS survivors (see ``AmgOutputs`` for the fields)."""
    o = plan.options
    b = images.shape[0]
    k = o.max_masks
    context = decoder.image_context(embed(images))
    low_all, iou = decode_candidates(decoder, context, grid, crop_box, input_hw, layer, plan)
    keep, stability, boxes, resize_ok = filter_candidates(low_all, iou, grid_valid, crop_box, input_hw, image_hw,
                                                          layer, plan)
    idx, kvalid, count = jax.vmap(
        lambda bx, sc, v: nms_padded(bx, sc, v, o.box_nms_thresh, k, count_all=last_nms))(boxes, iou, keep)
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    offset = jnp.stack([crop_box[:, 0], crop_box[:, 1], crop_box[:, 0], crop_box[:, 1]], axis=-1)
    return {
        "low": gather_candidates(low_all, idx),
        "boxes": take(boxes) + offset[:, None],
        "iou": take(iou),
        "stability": take(stability),
        "point_index": idx // 3,
        "valid": kvalid,
        "count": count,
        "crop_box": jnp.broadcast_to(crop_box[:, None], (b, k, 4)),
        "input_hw": jnp.broadcast_to(input_hw[:, None], (b, k, 2)),
        "resize_ok": resize_ok,
    }


def generate_padded(embed: Callable[[jax.Array], jax.Array], decoder: PromptDecoder, inputs: AmgInputs, plan: Plan,
                    *, return_masks: bool = True, return_low_res: bool = False) -> AmgOutputs:
    """Automatic mask generation for a batch of images (traceable; jit it with ``plan`` static).

    Args:
      embed: images (B, S, S, 3) -> embeddings (B, g, g, D), e.g. ``model.embed``.
      decoder: a ``PromptDecoder`` (``zsp_jax.amg.decoder.point_decoder(model)`` or ``model_decoder``).
      inputs: ``AmgInputs`` for B images of the plan's bucket.
      plan: static shapes and options.
      return_masks: also upsample the kept masks to (B, K, Hb, Wb) bool.
      return_low_res: also return their (B, K, S/4, S/4) logits.

    Returns:
      ``AmgOutputs``.
    """
    o = plan.options
    k = o.max_masks
    b = inputs.image_hw.shape[0]
    several_crops = sum(layer.n_crops for layer in plan.layers) > 1
    per_crop = []
    for li, (layer, (grid, gvalid)) in enumerate(zip(plan.layers, plan.grid_arrays())):
        fn = functools.partial(_process_crop, decoder, embed, grid=jnp.asarray(grid), grid_valid=jnp.asarray(gvalid),
                               layer=layer, plan=plan, last_nms=not several_crops)

        def one_crop(xs, fn=fn):
            img, cb, ih = xs
            return fn(encoder_input(img, ih, plan.image_size), cb, ih, inputs.image_hw)

        xs = (jnp.swapaxes(inputs.images[li], 0, 1), jnp.swapaxes(inputs.crop_boxes[li], 0, 1),
              jnp.swapaxes(inputs.input_hw[li], 0, 1))
        out = jax.lax.map(one_crop, xs)  # leaves (C_i, B, ...)
        out = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), out)  # (B, C_i, ...)
        out["layer"] = jnp.full((b, layer.n_crops, k), li, jnp.int32)
        out["crop_index"] = jnp.broadcast_to(jnp.arange(layer.n_crops, dtype=jnp.int32)[None, :, None],
                                             (b, layer.n_crops, k))
        per_crop.append(out)

    truncated = sum(jnp.sum(c["count"] > k, axis=1) for c in per_crop).astype(jnp.int32)
    resize_ok = functools.reduce(jnp.logical_and, [jnp.all(c["resize_ok"], axis=1) for c in per_crop])
    flat = {key: jnp.concatenate([c[key].reshape((b, -1) + c[key].shape[3:]) for c in per_crop], axis=1)
            for key in ("low", "boxes", "iou", "stability", "point_index", "valid", "crop_box", "input_hw",
                        "layer", "crop_index")}
    if several_crops:
        cb = flat["crop_box"]
        area = ((cb[..., 2] - cb[..., 0]) * (cb[..., 3] - cb[..., 1])).astype(jnp.float32)
        idx, kvalid, count = jax.vmap(lambda bx, sc, v: nms_padded(bx, sc, v, o.crop_nms_thresh, k, count_all=True))(
            flat["boxes"], 1.0 / area, flat["valid"])
        flat = {key: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
                for key, a in flat.items()}
        flat["valid"] = kvalid
    else:
        count = per_crop[0]["count"][:, 0]
    valid = flat["valid"]

    masks = None
    area = jnp.zeros((b, k), jnp.int32)
    if return_masks:
        def keep(_, chunk_masks, __):
            return None, chunk_masks

        _, masks, ok = scan_mask_chunks(keep, None, flat["low"], flat["input_hw"], flat["crop_box"], inputs.image_hw,
                                        plan, valid)  # masks (K // chunk, B, chunk, Hb, Wb)
        masks = jnp.moveaxis(masks, 1, 0)
        masks = masks.reshape((b, k) + masks.shape[3:]) & valid[..., None, None]
        area = jnp.sum(masks, axis=(2, 3), dtype=jnp.int32)
        resize_ok = resize_ok & jnp.all(ok | ~valid, axis=1)
        if o.mode == "fast":
            # Report the boxes of the masks actually returned (the NMS used subsampled ones).
            flat["boxes"] = box_from_any(jnp.any(masks, axis=3), jnp.any(masks, axis=2))

    zero = lambda a: jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, 0)  # noqa: E731
    return AmgOutputs(
        masks=masks,
        low_res_logits=zero(flat["low"]) if return_low_res else None,
        boxes=zero(flat["boxes"]),
        predicted_iou=zero(flat["iou"]),
        stability_score=zero(flat["stability"]),
        area=area,
        point_index=zero(flat["point_index"]),
        layer=zero(flat["layer"]),
        crop_index=zero(flat["crop_index"]),
        crop_box=zero(flat["crop_box"]),
        input_hw=zero(flat["input_hw"]),
        valid=valid,
        num_kept=jnp.minimum(count, k + 1),
        num_survived=count,
        truncated_crops=truncated,
        resize_ok=resize_ok,
    )

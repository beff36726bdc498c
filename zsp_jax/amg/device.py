"""The jit-compiled, static-shape automatic mask generator: a batch of images in, padded arrays out.

``generate_padded`` runs every step of segment-anything's ``SamAutomaticMaskGenerator._generate_masks``
on device for B images at once, with no host round trip:

for each crop layer (a Python loop; layer i has its own static grid and crop canvas) and each crop
of the layer (``lax.map``): one encoder pass over the B crop inputs, then a ``lax.scan`` over
point batches that decodes 3 masks per point and keeps their low-resolution logits and predicted
IoUs. The predicted-IoU filter comes next; in exact mode the candidates that pass are moved to the
front (in both modes) and their full-resolution logits are produced chunk by chunk (chunks without a surviving
candidate are skipped with ``lax.cond``, so the cost follows the number of survivors, like the
reference's), giving stability scores and tight boxes; fast mode evaluates only every
``fast_stride``-th pixel of each axis. Then the stability filter, the crop-edge filter and the box NMS, and the
first ``max_masks`` survivors are kept. Across crops, the reference's NMS that prefers smaller
crops; finally the kept masks are upsampled into the image canvas.

Everything has static shapes: ``max_masks`` outputs per image with a validity flag, and counts
that tell the host when more masks survived than fit (it then warns).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.amg.geometry import Bucket, crops_per_layer
from zsp_jax.amg.nms import nms_padded
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.upsample import Resize2d, band_for_long_side, upsample_logits

EDGE_ATOL = 20.0  # segment-anything's is_box_near_crop_edge tolerance, in pixels


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static shapes of one crop layer."""

    n_crops: int
    n_points: int  # points of the layer grid (before padding)
    batch: int  # points decoded per step: min(points_per_batch, n_points)
    n_padded: int  # n_points padded to a multiple of batch
    stats: Resize2d  # the crop canvas of the layer's statistics (every pixel, or every fast_stride-th)

    @property
    def chunk(self) -> int:
        """Candidates (3 per point) per exact-mode statistics step."""
        return 3 * self.batch


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about a call: options, model input size, bucket, per-layer shapes."""

    options: AmgOptions
    image_size: int
    bucket: Bucket
    layers: tuple[LayerPlan, ...]
    final: Resize2d  # the image canvas for the output masks
    mask_chunk: int = 16  # kept masks upsampled to full resolution at once (bounds the float32 temporary)

    @classmethod
    def create(cls, options: AmgOptions, image_size: int, bucket: Bucket, *, block: int = 64,
               mask_chunk: int = 16) -> "Plan":
        grids = options.layer_grids()
        ppb = options.points_per_batch
        layers = []
        stride = 1 if options.mode == "exact" else options.fast_stride
        widest = None
        for i, (grid, n_crops) in enumerate(zip(grids, crops_per_layer(options.crop_n_layers))):
            ch, cw = bucket.layer_canvas(i, options.crop_overlap_ratio)
            long_side = bucket.layer_min_long_side(i, options.crop_overlap_ratio)
            band = band_for_long_side(image_size, long_side, block, stride)
            stats = Resize2d(-(-ch // stride), -(-cw // stride), band, band, stride)
            full_band = band_for_long_side(image_size, long_side, block)
            widest = full_band if widest is None or full_band.window > widest.window else widest
            n = len(grid)
            batch = min(ppb, n)
            layers.append(LayerPlan(n_crops, n, batch, -(-n // batch) * batch, stats))
        final = Resize2d(bucket.height, bucket.width, widest, widest)
        return cls(options, image_size, bucket, tuple(layers), final, mask_chunk)

    def grid_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer: (padded grid (n_padded, 2) float32, valid (n_padded,) bool)."""
        out = []
        for grid, layer in zip(self.options.layer_grids(), self.layers):
            g = np.zeros((layer.n_padded, 2), np.float32)
            g[: layer.n_points] = grid
            v = np.arange(layer.n_padded) < layer.n_points
            out.append((g, v))
        return out


class AmgInputs(NamedTuple):
    """Device inputs for B images (see ``zsp_jax.amg.generator.prepare_inputs``).

    Attributes:
      images: per layer, (B, C_i, S, S, 3) encoder inputs of the crops: float32 normalised and
        zero-padded (as ``zsp_jax.models.sam.transforms.preprocess``), or uint8 resized crops at
        the top-left of the S x S canvas, normalised on device (``encoder_input``: the same float32
        arithmetic, a quarter of the bytes to transfer).
      crop_boxes: per layer, (B, C_i, 4) int32 XYXY crop boxes in the image frame.
      input_hw: per layer, (B, C_i, 2) int32 size of each resized crop inside its S x S input.
      image_hw: (B, 2) int32 original image sizes (H, W); all within the plan's bucket.
    """

    images: tuple[jax.Array, ...]
    crop_boxes: tuple[jax.Array, ...]
    input_hw: tuple[jax.Array, ...]
    image_hw: jax.Array


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
    truncated_crops: jax.Array
    resize_ok: jax.Array


def crop_geometry(image_hws: Any, plan: Plan) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Host: the crop boxes and resized crop sizes of B images (they depend only on the sizes).

    Args:
      image_hws: (B, 2) ints (H, W), every size inside ``plan.bucket``.

    Returns:
      (crop_boxes per layer (B, C_i, 4) int32, input_hw per layer (B, C_i, 2) int32).
    """
    from zsp_jax.amg.geometry import crop_plan

    o = plan.options
    per_image = [crop_plan((int(h), int(w)), o.crop_n_layers, o.crop_overlap_ratio, plan.image_size)
                 for h, w in np.asarray(image_hws)]
    boxes = tuple(np.stack([p[i][0] for p in per_image]).astype(np.int32) for i in range(len(plan.layers)))
    sizes = tuple(np.stack([p[i][1] for p in per_image]).astype(np.int32) for i in range(len(plan.layers)))
    return boxes, sizes


def _crop_resize(image: jax.Array, box: jax.Array, in_hw: jax.Array, canvas: tuple[int, int], plan: Plan
                 ) -> jax.Array:
    """One crop of one (Hb, Wb, 3) image -> the normalised, zero-padded (S, S, 3) encoder input."""
    from zsp_jax.models.sam.config import PIXEL_MEAN, PIXEL_STD

    s = plan.image_size
    ch, cw = canvas
    crop_h, crop_w = box[3] - box[1], box[2] - box[0]
    padded = jnp.pad(image.astype(jnp.float32), ((0, ch), (0, cw), (0, 0)), mode="edge")
    region = jax.lax.dynamic_slice(padded, (box[1], box[0], 0), (ch, cw, 3))
    # Replicate the crop's last row / column beyond it, so the filter never reads outside the crop.
    region = region[jnp.minimum(jnp.arange(ch), crop_h - 1)][:, jnp.minimum(jnp.arange(cw), crop_w - 1)]
    scale = jnp.stack([in_hw[0] / crop_h, in_hw[1] / crop_w]).astype(jnp.float32)
    resized = jax.image.scale_and_translate(region, (s, s, 3), (0, 1), scale, jnp.zeros(2, jnp.float32),
                                            method="linear", antialias=True)
    resized = jnp.clip(jnp.round(resized), 0, 255)
    x = (resized - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
    inside = (jnp.arange(s)[:, None] < in_hw[0]) & (jnp.arange(s)[None, :] < in_hw[1])
    return jnp.where(inside[..., None], x, 0.0)


def encoder_input(images: jax.Array, input_hw: jax.Array, image_size: int) -> jax.Array:
    """(B, S, S, 3) crops -> float32 SAM encoder input; uint8 crops are normalised here.

    uint8 input is the PIL-resized crop at the top-left of the canvas (anything else is ignored):
    ``(x - pixel_mean) / pixel_std`` inside the (h', w') of ``input_hw`` (B, 2), 0 outside, looked
    up from a table of the host's own ``normalize_and_pad`` arithmetic (``zsp_jax.utils.lut``), so
    equal to it bit for bit. Float input is returned as it is.
    """
    if images.dtype != jnp.uint8:
        return images
    from zsp_jax.models.sam.transforms import normalize_and_pad
    from zsp_jax.utils.lut import apply_uint8_table, uint8_table

    table = uint8_table(lambda v: normalize_and_pad(v[:, None], 256)[:, 0])
    x = apply_uint8_table(images, table)
    s = jnp.arange(image_size)
    inside = (s[None, :, None] < input_hw[:, 0, None, None]) & (s[None, None, :] < input_hw[:, 1, None, None])
    return jnp.where(inside[..., None], x, 0.0)


def device_inputs(images: jax.Array, image_hw: jax.Array, crop_boxes: tuple[jax.Array, ...],
                  input_hw: tuple[jax.Array, ...], plan: Plan) -> AmgInputs:
    """``AmgInputs`` built on device (traceable), for pipelines whose images are already on device.

    Crops are resized with an antialiased triangle filter (``jax.image.scale_and_translate``) in
    float arithmetic instead of PIL's 8-bit fixed point, so the encoder inputs differ from the
    reference's (``prepare_inputs``) by about one grey level on some pixels; masks then differ
    where logits are that close to the threshold. Use ``prepare_inputs`` for parity.

    Args:
      images: (B, Hb, Wb, 3) uint8 or float 0..255 RGB, each image at the top-left of the bucket canvas.
      image_hw: (B, 2) int32 true sizes.
      crop_boxes, input_hw: from ``crop_geometry`` (host) for the same sizes.
      plan: the static plan (``pixel_mean`` / ``pixel_std`` are SAM's).
    """
    layers = []
    for i, layer in enumerate(plan.layers):
        canvas = plan.bucket.layer_canvas(i, plan.options.crop_overlap_ratio)
        fn = jax.vmap(jax.vmap(lambda box, hw, img: _crop_resize(img, box, hw, canvas, plan), (0, 0, None)))
        layers.append(fn(crop_boxes[i], input_hw[i], images))
    return AmgInputs(tuple(layers), tuple(crop_boxes), tuple(input_hw), image_hw)


# A decoder: (embeddings (B, g, g, D), points (B, N, 2) in the resized-input frame)
#   -> (low-res logits (B, N, 3, s, s) float32, predicted IoU (B, N, 3) float32).
DecodeFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def model_decoder(model: Any) -> DecodeFn:
    """``Sam.decode`` with one foreground point per prompt, three masks per point."""

    def decode(embeddings: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
        labels = jnp.ones(points.shape[:2] + (1,), jnp.int32)
        return model.decode(embeddings, points[:, :, None, :], labels, multimask_output=True)

    return decode


# ----------------------------------------------------------------------------- statistics


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


def _mask_stats(low: jax.Array, input_hw: jax.Array, crop_hw: jax.Array, layer: LayerPlan, plan: Plan
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stability scores and tight boxes of N masks of one crop from their full-resolution logits.

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


def _near_crop_edge(boxes: jax.Array, crop_box: jax.Array, image_hw: jax.Array) -> jax.Array:
    """(N, 4) crop-frame boxes -> (N,) bool: near an edge of the crop that is not an image edge."""
    full = boxes.astype(jnp.float32) + jnp.stack([crop_box[0], crop_box[1], crop_box[0], crop_box[1]]
                                                 ).astype(jnp.float32)
    image_box = jnp.stack([0, 0, image_hw[1], image_hw[0]]).astype(jnp.float32)
    near_crop = jnp.abs(full - crop_box.astype(jnp.float32)) <= EDGE_ATOL
    near_image = jnp.abs(full - image_box) <= EDGE_ATOL
    return jnp.any(near_crop & ~near_image, axis=-1)


# ----------------------------------------------------------------------------- one crop


def _process_crop(decode: DecodeFn, embed: Callable[[jax.Array], jax.Array], images: jax.Array,
                  crop_box: jax.Array, input_hw: jax.Array, image_hw: jax.Array, grid: jax.Array,
                  grid_valid: jax.Array, layer: LayerPlan, plan: Plan) -> dict[str, jax.Array]:
    """One crop of B images -> its (B, K) NMS survivors (see ``AmgOutputs`` for the fields)."""
    o = plan.options
    b = images.shape[0]
    ppb = layer.batch
    n_batches = layer.n_padded // ppb
    k = o.max_masks

    embeddings = embed(images)
    crop_hw = jnp.stack([crop_box[:, 3] - crop_box[:, 1], crop_box[:, 2] - crop_box[:, 0]], axis=-1)  # (B, 2)
    crop_wh = crop_hw[:, ::-1].astype(jnp.float32)
    in_wh = input_hw[:, ::-1].astype(jnp.float32)
    # Points in crop pixels, then in the resized-input frame (ResizeLongestSide.apply_coords).
    points = (grid[None] * crop_wh[:, None]) * (in_wh / crop_wh)[:, None]  # (B, P, 2)
    points = points.reshape(b, n_batches, ppb, 2).transpose(1, 0, 2, 3)

    def decode_batch(_, pts):
        low, iou = decode(embeddings, pts)
        return None, (low.astype(jnp.float32), iou.astype(jnp.float32))

    _, (low_all, iou_all) = jax.lax.scan(decode_batch, None, points)  # (nb, B, ppb, 3, s, s), (nb, B, ppb, 3)
    s = low_all.shape[-1]
    m = layer.n_padded * 3
    iou = iou_all.transpose(1, 0, 2, 3).reshape(b, m)
    point_of = jnp.arange(m, dtype=jnp.int32) // 3
    keep = jnp.broadcast_to(grid_valid[point_of], (b, m))
    if o.pred_iou_thresh > 0.0:
        keep = keep & (iou > o.pred_iou_thresh)

    def gather_low(bi, ci):
        """Low-res logits of candidates ci (any shape) of images bi -> (..., s, s)."""
        p, mk = ci // 3, ci % 3
        return low_all[p // ppb, bi, p % ppb, mk]

    # Survivors of the IoU filter first (stable), then statistics chunk by chunk; a chunk
    # with no survivor in any image is skipped.
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)  # (B, M)
    n_chunks = -(-m // layer.chunk)
    pad = n_chunks * layer.chunk - m
    order_p = jnp.pad(order, ((0, 0), (0, pad)))
    keep_sorted = jnp.pad(jnp.take_along_axis(keep, order, axis=1), ((0, 0), (0, pad)))
    order_c = order_p.reshape(b, n_chunks, layer.chunk).transpose(1, 0, 2)
    keep_c = keep_sorted.reshape(b, n_chunks, layer.chunk).transpose(1, 0, 2)
    bi = jnp.arange(b)[:, None]

    def stats_chunk(_, xs):
        ci, kc = xs

        def compute(_):
            low = gather_low(jnp.broadcast_to(bi, ci.shape), ci)  # (B, chunk, s, s)
            return jax.vmap(lambda l, ih, ch: _mask_stats(l, ih, ch, layer, plan))(low, input_hw, crop_hw)

        def skip(_):
            return (jnp.zeros((b, layer.chunk), jnp.float32), jnp.zeros((b, layer.chunk, 4), jnp.int32),
                    jnp.ones((b,), bool))

        return None, jax.lax.cond(jnp.any(kc), compute, skip, None)

    _, (stab_c, box_c, ok_c) = jax.lax.scan(stats_chunk, None, (order_c, keep_c))
    stab_sorted = stab_c.transpose(1, 0, 2).reshape(b, -1)[:, :m]
    box_sorted = box_c.transpose(1, 0, 2, 3).reshape(b, -1, 4)[:, :m]
    inverse = jnp.argsort(order, axis=1)
    stability = jnp.take_along_axis(stab_sorted, inverse, axis=1)
    boxes = jnp.take_along_axis(box_sorted, inverse[..., None], axis=1)
    resize_ok = jnp.all(ok_c, axis=0)
    if o.stability_score_thresh > 0.0:
        keep = keep & (stability >= o.stability_score_thresh)
    keep = keep & ~jax.vmap(_near_crop_edge)(boxes, crop_box, image_hw)

    idx, kvalid, count = jax.vmap(lambda bx, sc, v: nms_padded(bx, sc, v, o.box_nms_thresh, k))(boxes, iou, keep)
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    offset = jnp.stack([crop_box[:, 0], crop_box[:, 1], crop_box[:, 0], crop_box[:, 1]], axis=-1)
    return {
        "low": gather_low(jnp.arange(b)[:, None], idx),
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


# ----------------------------------------------------------------------------- full-resolution masks


def mask_chunk_size(k: int, requested: int) -> int:
    """The largest divisor of ``k`` (masks per image) that is <= ``requested`` (masks upsampled at once)."""
    requested = max(1, min(requested, k))
    return max(d for d in range(1, requested + 1) if k % d == 0)


def scan_mask_chunks(fn: Callable[[Any, jax.Array, jax.Array], tuple[Any, Any]], carry: Any, low: jax.Array,
                     input_hw: jax.Array, crop_box: jax.Array, image_hw: jax.Array, plan: Plan,
                     valid: jax.Array | None = None) -> tuple[Any, Any, jax.Array]:
    """B images' kept masks at full resolution, ``plan.mask_chunk`` slots at a time, folded with ``fn``.

    Each chunk's float32 logits ((B, chunk, Hb, Wb), not (B, K, Hb, Wb)) exist only inside one
    step, which bounds the memory of large images; ``fn`` consumes the boolean masks of the chunk.
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
    c = mask_chunk_size(k, plan.mask_chunk)
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


# ----------------------------------------------------------------------------- all crops


def generate_padded(embed: Callable[[jax.Array], jax.Array], decode: DecodeFn, inputs: AmgInputs, plan: Plan, *,
                    return_masks: bool = True, return_low_res: bool = False) -> AmgOutputs:
    """Automatic mask generation for a batch of images (traceable; jit it with ``plan`` static).

    Args:
      embed: images (B, S, S, 3) -> embeddings (B, g, g, D), e.g. ``model.embed``.
      decode: see ``DecodeFn`` (``model_decoder(model)`` or ``zsp_jax.amg.decoder.point_decoder``).
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
    per_crop = []
    for li, (layer, (grid, gvalid)) in enumerate(zip(plan.layers, plan.grid_arrays())):
        grid_j, gvalid_j = jnp.asarray(grid), jnp.asarray(gvalid)
        fn = functools.partial(_process_crop, decode, embed, grid=grid_j, grid_valid=gvalid_j, layer=layer,
                               plan=plan)

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
    if sum(l.n_crops for l in plan.layers) > 1:
        cb = flat["crop_box"]
        area = ((cb[..., 2] - cb[..., 0]) * (cb[..., 3] - cb[..., 1])).astype(jnp.float32)
        scores = 1.0 / area
        idx, kvalid, count = jax.vmap(lambda bx, sc, v: nms_padded(bx, sc, v, o.crop_nms_thresh, k))(
            flat["boxes"], scores, flat["valid"])
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
        num_kept=count,
        truncated_crops=truncated,
        resize_ok=resize_ok,
    )

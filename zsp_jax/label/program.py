"""The labeller's compiled program: images in, pseudo-label maps out, everything on device.

One program per image-size bucket (``LabelPlan``) runs, for a group of images per device:

1. SAM's automatic mask generator (``zsp_jax.amg.generate.generate_padded``): encoder, prompt
   decoding, filters, NMS; it keeps each surviving mask's low-resolution logits;
2. GEM-CLIP dense features of the image resized to ``clip_size`` (``ClipModel.dense_features``);
3. one pass over the kept masks at full resolution, ``mask_chunk`` at a time
   (``zsp_jax.amg.mask_chunks.scan_mask_chunks``), that for each chunk
   * measures areas and tight boxes,
   * pools the chunk onto the feature grid (``pool_weights``): the paper's masked average
     ``f_k = sum_x S_k(x) F(x) / sum_x S_k(x)`` with F the features resized to the image is
     ``(A^T S_k B) . F / area`` for the resize's separable weight matrices A (H x gh) and
     B (W x gw): bilinear (``pooling="bilinear"``, as GEM resizes its maps) or each pixel's
     own cell (``"area"``), exactly, without ever building the H x W x D map,
   * paints: every pixel keeps the covering mask that wins the paint order (``area_desc``:
     the smallest mask, i.e. larger ones painted first and smaller on top; ties go to the
     later mask, as sequential painting does);
4. classification of each segment embedding against the class prompts (``classify``) and the
   label map ``class_of[winner]`` (pixels no segment covers: 255 or background).

Only the uint8 label map, optionally a uint8 confidence map and the per-segment records (with
bit-packed masks when segment files are wanted) leave the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.amg.decoder import PromptDecoder
from zsp_jax.amg.generate import AmgOutputs, generate_padded
from zsp_jax.amg.inputs import AmgInputs
from zsp_jax.amg.mask_chunks import scan_mask_chunks
from zsp_jax.amg.plan import Plan
from zsp_jax.amg.statistics import box_from_any
from zsp_jax.label.options import Rules
from zsp_jax.models.clip import GemConfig
from zsp_jax.utils.resize import bilinear_taps


@dataclasses.dataclass(frozen=True)
class LabelPlan:
    """Static description of one compiled labelling program."""

    amg: Plan
    rules: Rules
    gem: GemConfig
    clip_size: int
    return_confidence: bool = False
    return_masks: bool = False


class LabelInputs(NamedTuple):
    """Device inputs of B images.

    Attributes:
      amg: ``AmgInputs`` with uint8 crops (``prepare_inputs(..., as_uint8=True)``).
      clip_images: (B, c, c, 3) uint8, each image resized to ``clip_size`` (PIL bicubic).
    """

    amg: AmgInputs
    clip_images: jax.Array


class LabelOutputs(NamedTuple):
    """Per image (leading axis B), K = ``max_masks`` segment slots.

    Attributes:
      label: (B, Hb, Wb) uint8 pseudo label in the bucket canvas (the image is the top-left (H, W)).
      confidence: (B, Hb, Wb) uint8 winning segment's score x 255 (0 where uncovered), or None.
      seg_label: (B, K) int32 label value of each segment (0 = background).
      seg_best: (B, K) int32 the best-matching non-background class (1..N).
      seg_similarity: (B, K) float32 cosine similarity to ``seg_best``.
      seg_score: (B, K) float32 the no-class rule's score of ``seg_label`` (cosine, or softmax probability).
      predicted_iou, stability_score: (B, K) float32.
      boxes: (B, K, 4) int32 XYXY (max inclusive) of the full-resolution masks.
      area: (B, K) int32 pixels.
      valid: (B, K) bool: a non-empty kept mask.
      packed_masks: (B, K, Hb, ceil(Wb / 8)) uint8 ``packbits`` of the masks along x, or None.
      num_kept, num_survived, truncated_crops: (B,) int32 as ``AmgOutputs``.
      resize_ok: (B,) bool.
    """

    label: jax.Array
    confidence: jax.Array | None
    seg_label: jax.Array
    seg_best: jax.Array
    seg_similarity: jax.Array
    seg_score: jax.Array
    predicted_iou: jax.Array
    stability_score: jax.Array
    boxes: jax.Array
    area: jax.Array
    valid: jax.Array
    packed_masks: jax.Array | None
    num_kept: jax.Array
    num_survived: jax.Array
    truncated_crops: jax.Array
    resize_ok: jax.Array


# ----------------------------------------------------------------------------- pooling


def pool_weights(n_cells: int, length: jax.Array, canvas: int, method: str) -> jax.Array:
    """(canvas, n_cells) float32: how much of pixel row y's value comes from feature cell i.

    The feature grid of ``n_cells`` cells spans the image's ``length`` pixels (GEM sees the image
    resized to a square, so each axis scales on its own). Rows at or beyond ``length`` (padding)
    are 0.

    * ``"bilinear"``: torch's ``F.interpolate(mode="bilinear", align_corners=False)`` taps from
      the grid to the image (``zsp_jax.utils.resize.bilinear_taps``, the reference's);
    * ``"area"``: 1 for the cell that holds the pixel's centre, ``floor((y + 0.5) * n / length)``
      (integer arithmetic, so no rounding decides a boundary).
    """
    y = jnp.arange(canvas, dtype=jnp.int32)
    inside = y < length
    cells = jnp.arange(n_cells, dtype=jnp.int32)
    if method == "area":
        cell = ((2 * y + 1) * n_cells) // (2 * jnp.maximum(length, 1))
        w = (cell[:, None] == cells[None, :]).astype(jnp.float32)
    else:
        i0, i1, w0, w1 = bilinear_taps(jnp.int32(n_cells), length, canvas)
        w = (jnp.where(i0[:, None] == cells, w0[:, None], 0.0) + jnp.where(i1[:, None] == cells, w1[:, None], 0.0))
    return jnp.where(inside[:, None], w, 0.0)


# ----------------------------------------------------------------------------- classification


def label_scores(embeddings: jax.Array, text: jax.Array, rules: Rules) -> jax.Array:
    """(K, D) segment embeddings, (P, D) unit prompt embeddings -> (K, L) cosine per label value.

    A label with several prompts scores the max (``synonyms="max"``) or the mean of its
    prompts' cosines; a label without prompts (background unless background prompts are given)
    scores -inf.
    """
    emb = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    sims = emb @ text.T  # (K, P)
    onehot = jnp.asarray(np.eye(rules.num_labels, dtype=bool)[np.asarray(rules.row_labels)])  # (P, L)
    if rules.synonyms == "max":
        scores = jnp.max(jnp.where(onehot[None], sims[:, :, None], -jnp.inf), axis=1)
    else:
        count = jnp.sum(onehot, axis=0)
        scores = jnp.where(count > 0, (sims @ onehot.astype(sims.dtype)) / jnp.maximum(count, 1), -jnp.inf)
    return scores


def classify(scores: jax.Array, rules: Rules) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The no-class rule on (K, L) label scores (``label_scores``).

    Returns:
      label (K,) int32 (the best label, or 0 = background when it is a class whose score is
      below the threshold), best class (K,) int32 among 1..L-1, its cosine (K,) float32, and the
      rule's score of the best label (K,) float32: its cosine (``cosine``, ``none``) or its
      softmax(temperature * cosine) probability over the labels that have prompts (``softmax``).
    """
    has_prompts = jnp.isfinite(scores[0]) if scores.shape[0] else jnp.zeros(scores.shape[1], bool)
    best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    best_fg = (jnp.argmax(scores[:, 1:], axis=-1) + 1).astype(jnp.int32)
    fg_cos = jnp.take_along_axis(scores, best_fg[:, None], axis=1)[:, 0]
    if rules.no_class == "softmax":
        logits = jnp.where(has_prompts[None], rules.temperature * scores, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        score = jnp.take_along_axis(probs, best[:, None], axis=1)[:, 0]
    else:
        score = jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
    label = best
    if rules.no_class != "none":
        label = jnp.where((best != 0) & (score < rules.threshold), 0, best)
    return label, best_fg, fg_cos, score


# ----------------------------------------------------------------------------- one image


def _paint_key(area: jax.Array, iou: jax.Array, order: str) -> jax.Array:
    """Per mask, the key whose largest value wins a pixel (ties: the later mask)."""
    if order == "area_desc":  # larger painted first, smaller on top: the smallest wins
        return -area.astype(jnp.float32)
    if order == "area_asc":
        return area.astype(jnp.float32)
    return iou  # iou_asc: ascending predicted IoU, the most confident on top


def label_images(amg: AmgOutputs, tokens: jax.Array, text: jax.Array, image_hw: jax.Array, plan: LabelPlan
                 ) -> dict[str, Any]:
    """B images' label maps and segment records.

    Args:
      amg: the images' ``AmgOutputs`` with ``low_res_logits`` (leading axis B).
      tokens: (B, gh, gw, D) float32 dense features.
      text: (P, D) unit prompt embeddings.
      image_hw: (B, 2) int32.

    Returns:
      a dict of (B, ...) arrays named as the fields of ``LabelOutputs``.
    """
    rules = plan.rules
    hb, wb = plan.amg.bucket.height, plan.amg.bucket.width
    b, gh, gw, d = tokens.shape
    rows = jax.vmap(lambda n: pool_weights(gh, n, hb, rules.pooling))(image_hw[:, 0])  # (B, Hb, gh)
    cols = jax.vmap(lambda n: pool_weights(gw, n, wb, rules.pooling))(image_hw[:, 1])  # (B, Wb, gw)
    iou = amg.predicted_iou

    def step(carry, masks, idx):
        best_key, best_idx = carry  # (B, Hb, Wb)
        area = jnp.sum(masks, axis=(2, 3), dtype=jnp.int32)  # (B, c)
        ok = amg.valid[:, idx] & (area > 0)
        m = masks & ok[..., None, None]
        key = _paint_key(area, iou[:, idx], rules.paint_order)[..., None, None]
        chunk_key = jnp.max(jnp.where(m, key, -jnp.inf), axis=1)
        chunk_idx = jnp.max(jnp.where(m & (key == chunk_key[:, None]), idx[None, :, None, None], -1), axis=1)
        better = (chunk_idx >= 0) & (chunk_key >= best_key)  # a later chunk wins ties, as later painting
        carry = (jnp.where(better, chunk_key, best_key), jnp.where(better, chunk_idx, best_idx))
        mf = m.astype(jnp.float32)
        cov = jnp.einsum("bhi,bchj->bcij", rows, jnp.einsum("bchw,bwj->bchj", mf, cols))  # (B, c, gh, gw)
        boxes = box_from_any(jnp.any(m, axis=3), jnp.any(m, axis=2))  # (B, c, 4)
        packed = jnp.packbits(m, axis=-1) if plan.return_masks else None
        return carry, (area, cov, boxes, packed)

    init = (jnp.full((b, hb, wb), -jnp.inf, jnp.float32), jnp.full((b, hb, wb), -1, jnp.int32))
    (_, winner), (area, cov, boxes, packed), ok = scan_mask_chunks(
        step, init, amg.low_res_logits, amg.input_hw, amg.crop_box, image_hw, plan.amg, amg.valid)
    k = amg.valid.shape[1]
    slots = lambda a: jnp.moveaxis(a, 1, 0).reshape((b, k) + a.shape[3:])  # (K//c, B, c, ...) -> (B, K, ...)  # noqa: E731
    area, cov, boxes = slots(area), slots(cov).reshape(b, k, gh * gw), slots(boxes)
    valid = amg.valid & (area > 0)
    weight = jnp.maximum(jnp.sum(cov, axis=2, keepdims=True), 1e-12)
    embeddings = jnp.einsum("bkg,bgd->bkd", cov, tokens.reshape(b, gh * gw, d).astype(jnp.float32)) / weight
    seg_label, seg_best, seg_cos, seg_score = jax.vmap(lambda e: classify(label_scores(e, text, rules), rules))(
        embeddings)
    seg_label = jnp.where(valid, seg_label, 0)
    covered = winner >= 0
    at = jnp.maximum(winner, 0)
    take = jax.vmap(lambda values, index: values[index])
    label = jnp.where(covered, take(seg_label, at), rules.uncovered_value).astype(jnp.uint8)
    out = {"label": label, "seg_label": seg_label, "seg_best": jnp.where(valid, seg_best, 0),
           "seg_similarity": jnp.where(valid, seg_cos, 0.0), "seg_score": jnp.where(valid, seg_score, 0.0),
           "boxes": jnp.where(valid[..., None], boxes, 0), "area": jnp.where(valid, area, 0), "valid": valid,
           "resize_ok": jnp.all(ok | ~amg.valid, axis=1)}
    if plan.return_confidence:
        conf = jnp.round(jnp.clip(take(seg_score, at), 0.0, 1.0) * 255.0)
        out["confidence"] = jnp.where(covered, conf, 0).astype(jnp.uint8)
    if plan.return_masks:
        out["packed_masks"] = slots(packed)
    return out


# ----------------------------------------------------------------------------- a group of images


def label_group(sam: Any, decoder: PromptDecoder, clip: Any, clip_table: jax.Array, text: jax.Array,
                inputs: LabelInputs, plan: LabelPlan) -> LabelOutputs:
    """The whole program for B images of one bucket (traceable; ``plan`` static).

    Args:
      sam: a ``zsp_jax.models.sam.Sam``; decoder: its AMG prompt decoder (``point_decoder``).
      clip: a ``ClipModel``; clip_table: (256, 3) CLIP normalisation table (``zsp_jax.utils.lut``).
      text: (P, D) unit prompt embeddings.
      inputs: ``LabelInputs`` of B images.
    """
    from zsp_jax.utils.lut import apply_uint8_table

    amg = generate_padded(sam.embed, decoder, inputs.amg, plan.amg, return_masks=False, return_low_res=True)
    pixels = apply_uint8_table(inputs.clip_images, clip_table)
    tokens = clip.dense_features(pixels, plan.gem, normalize=plan.rules.normalize_tokens).tokens
    per_image = label_images(amg, tokens.astype(jnp.float32), text, inputs.amg.image_hw, plan)
    return LabelOutputs(
        label=per_image["label"], confidence=per_image.get("confidence"), seg_label=per_image["seg_label"],
        seg_best=per_image["seg_best"], seg_similarity=per_image["seg_similarity"],
        seg_score=per_image["seg_score"], predicted_iou=jnp.where(per_image["valid"], amg.predicted_iou, 0.0),
        stability_score=jnp.where(per_image["valid"], amg.stability_score, 0.0), boxes=per_image["boxes"],
        area=per_image["area"], valid=per_image["valid"], packed_masks=per_image.get("packed_masks"),
        num_kept=amg.num_kept, num_survived=amg.num_survived, truncated_crops=amg.truncated_crops,
        resize_ok=amg.resize_ok & per_image["resize_ok"])

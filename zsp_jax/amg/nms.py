"""Greedy box non-maximum suppression with torchvision's semantics: static-shape JAX and numpy.

torchvision's ``nms`` / ``batched_nms`` (one category, as segment-anything uses it):

* boxes are visited in order of descending score; equal scores keep their input order (the
  sort is stable);
* a visited box is kept unless a kept box suppresses it; a kept box suppresses every later box
  whose IoU with it is **greater** than the threshold;
* IoU = inter / (area_a + area_b - inter) with areas ``(x2 - x1) * (y2 - y1)`` (no +1), in
  float32; a NaN IoU (two empty boxes) suppresses nothing;
* the result lists kept indices in visiting order.

``nms_padded`` runs under ``jax.jit`` and ``vmap``: fixed-size inputs with a validity mask, a
fixed-size output of ``max_keep`` indices plus a count. It is written here rather than taken
from a library because the JAX NMS implementations we know (scenic's MLPerf-derived one,
jax-based detection ports) suppress with ``>=`` or use +1 areas, or sort unstably, any of which
changes which masks survive. The suppression loop is a ``lax.while_loop`` that visits only the
valid boxes and stops as soon as ``max_keep + 1`` boxes are kept (one more than fits, so the
caller can tell that the output was truncated; ``count_all`` counts them all); each step computes
one IoU row, O(N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _iou_row(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU (float32) of one XYXY box against (N, 4) boxes, torchvision's formula."""
    x1 = jnp.maximum(box[0], boxes[:, 0])
    y1 = jnp.maximum(box[1], boxes[:, 1])
    x2 = jnp.minimum(box[2], boxes[:, 2])
    y2 = jnp.minimum(box[3], boxes[:, 3])
    inter = jnp.maximum(x2 - x1, 0.0) * jnp.maximum(y2 - y1, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def threshold_below(threshold: float) -> np.float32:
    """The largest float32 <= ``threshold``: ``iou32 > t`` (torchvision compares a float32 IoU with a
    double threshold) equals ``iou32 > threshold_below(t)`` for every float32 IoU."""
    t32 = np.float32(threshold)
    if float(t32) > float(threshold):
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return t32


def score_order(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """(N,) int32 permutation: valid entries by descending score (stable), then the invalid ones."""
    n = scores.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    invalid = (~valid).astype(jnp.int32)
    # Sorting -score ascending is "descending, stable"; NaN scores sort last among the valid ones.
    neg = jnp.where(valid, -scores.astype(jnp.float32), 0.0)
    _, _, order = jax.lax.sort((invalid, neg, idx), num_keys=2, is_stable=True)
    return order


def nms_padded(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float | jax.Array,
               max_keep: int, *, count_all: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy NMS on a fixed-size set of boxes.

    Args:
      boxes: (N, 4) XYXY, any real dtype (computed in float32 like torchvision on float boxes).
      scores: (N,) float.
      valid: (N,) bool; invalid boxes are neither kept nor suppress anything.
      iou_threshold: suppress IoU > this; a Python float is compared as torchvision does (float32
        IoU against the double threshold), a traced scalar in float32.
      max_keep: static size of the output.
      count_all: go on after ``max_keep + 1`` boxes are kept, to count every box the NMS keeps (the
        loop then visits every valid box; by default it stops as soon as the output is known to be
        truncated).

    Returns:
      keep: (max_keep,) int32 indices into ``boxes`` in visiting (descending score) order;
        entries past ``count`` are 0.
      keep_valid: (max_keep,) bool, True for the first min(count, max_keep) entries.
      count: () int32, boxes kept, capped at max_keep + 1 (more than max_keep = truncated) unless
        ``count_all``.
    """
    n = boxes.shape[0]
    order = score_order(scores, valid)
    b = boxes.astype(jnp.float32)[order]
    v = valid[order]
    n_valid = jnp.sum(v.astype(jnp.int32))
    static_thr = isinstance(iou_threshold, (int, float, np.floating))
    thr = jnp.asarray(threshold_below(iou_threshold) if static_thr else iou_threshold, jnp.float32)

    def cond(state):
        i, kept, _, _ = state
        return (i < n_valid) if count_all else (i < n_valid) & (kept <= max_keep)

    def body(state):
        i, kept, suppressed, out = state
        keep_i = ~suppressed[i]
        iou = _iou_row(b[i], b)
        # Only later boxes can be suppressed; comparisons with NaN are False, as in torchvision.
        hit = (iou > thr) & (jnp.arange(n) > i)
        suppressed = jnp.where(keep_i, suppressed | hit, suppressed)
        out = jnp.where(keep_i & (kept < max_keep), out.at[jnp.minimum(kept, max_keep - 1)].set(i), out)
        return i + 1, kept + keep_i.astype(jnp.int32), suppressed, out

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), bool), jnp.zeros((max_keep,), jnp.int32))
    _, kept, _, out = jax.lax.while_loop(cond, body, init)
    keep_valid = jnp.arange(max_keep) < kept
    keep = jnp.where(keep_valid, order[out], 0)
    return keep, keep_valid, kept


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Host greedy NMS with the same semantics; returns kept indices (int64) in visiting order."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores)
    thr = threshold_below(iou_threshold)
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(n, bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = order[pos + 1:]
            iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), np.float32(0))
            ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), np.float32(0))
            inter = iw * ih
            iou = inter / (areas[i] + areas[rest] - inter)
            suppressed[rest[iou > thr]] = True
    return np.asarray(keep, np.int64)

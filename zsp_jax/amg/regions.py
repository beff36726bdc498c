"""``min_mask_region_area`` post-processing: fill small holes, remove small islands, NMS again (host).

Semantics of segment-anything's ``postprocess_small_regions`` / ``remove_small_regions``:

1. holes: label the 8-connected components of the mask's complement (OpenCV,
   ``connectedComponentsWithStats(..., 8)``); components (other than label 0, which is the mask
   itself plus whatever OpenCV numbers first) smaller than the threshold are filled;
2. islands: label the components of the result; those smaller than the threshold are removed,
   but if all of them are, the largest is kept;
3. a mask that either step changed gets score 0, an unchanged one score 1; boxes are recomputed
   and box NMS at ``max(box_nms_thresh, crop_nms_thresh)`` keeps, in that score order (stable),
   the masks to return; the changed survivors get their new mask and box.

This stays on the host, with OpenCV (the reference's own labeller, so equal results by
construction), run over masks in a thread pool (OpenCV releases the GIL). Measured on the 2-core
development machine: a few milliseconds per mask for both passes (docs/benchmarks.md), against
connected components on device, which need an iterative label propagation whose number of
steps grows with the component diameter (hundreds of 3x3 min-pool passes over every mask).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from zsp_jax.amg.nms import nms_numpy


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fills holes (mode "holes") or removes islands (mode "islands") smaller than ``area_thresh``.

    Args:
      mask: (H, W) bool.

    Returns:
      (new mask (H, W) bool, changed).
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (mask ^ holes).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    lut = np.zeros(n_labels, bool)
    if holes:
        lut[0] = True
        lut[1:] = small
    else:
        lut[1:] = ~small
        if not lut.any():
            lut[int(np.argmax(sizes)) + 1] = True
    return lut[regions], True


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) int64 XYXY, max inclusive, empty -> 0 (the reference's batched_mask_to_box)."""
    n, h, w = masks.shape
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    out = np.zeros((n, 4), np.int64)
    has = rows.any(axis=1)
    out[has, 1] = rows[has].argmax(axis=1)
    out[has, 3] = h - 1 - rows[has, ::-1].argmax(axis=1)
    out[has, 0] = cols[has].argmax(axis=1)
    out[has, 2] = w - 1 - cols[has, ::-1].argmax(axis=1)
    return out


def _clean(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    mask, changed_h = remove_small_regions(mask, min_area, "holes")
    mask, changed_i = remove_small_regions(mask, min_area, "islands")
    return mask, changed_h or changed_i


def postprocess_small_regions(masks: np.ndarray, boxes: np.ndarray, min_area: int, nms_thresh: float,
                              *, workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's post-processing of one image's masks.

    Args:
      masks: (N, H, W) bool, in output order.
      boxes: (N, 4) int XYXY boxes of the masks (kept for unchanged masks, as the reference does).
      min_area: the region area threshold (> 0).
      nms_thresh: max(box_nms_thresh, crop_nms_thresh).
      workers: threads for OpenCV (default: the machine's cores).

    Returns:
      keep (M,) int64 indices into the inputs in output order, new masks (M, H, W) bool, new
      boxes (M, 4) int64.
    """
    n = len(masks)
    if n == 0:
        return np.zeros((0,), np.int64), masks[:0], np.asarray(boxes, np.int64)[:0]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and n > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda m: _clean(m, min_area), list(masks)))
    else:
        results = [_clean(m, min_area) for m in masks]
    new_masks = np.stack([r[0] for r in results])
    changed = np.asarray([r[1] for r in results], bool)
    new_boxes = masks_to_boxes(new_masks)
    keep = nms_numpy(new_boxes, (~changed).astype(np.float32), nms_thresh)
    out_boxes = np.where(changed[:, None], new_boxes, np.asarray(boxes, np.int64))
    return keep, new_masks[keep], out_boxes[keep]

"""Run-length encodings of binary masks, as segment-anything and pycocotools write them (host, numpy).

* uncompressed RLE: ``{"size": [h, w], "counts": [n0, n1, ...]}``, runs over the mask in
  column-major (Fortran) order, starting with a run of zeros (0 if the first pixel is set);
  the counts are Python ints. This is the reference's ``mask_to_rle_pytorch`` output.
* COCO RLE: the same runs compressed by pycocotools (``counts`` a UTF-8 string), which is what
  the reference's ``coco_encode_rle`` returns.

``masks_to_rle`` encodes many masks with one vectorised pass (a diff along the flattened
column-major masks and one ``nonzero``), instead of one Python loop per mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def masks_to_rle(masks: np.ndarray, *, transposed: bool = False) -> list[dict[str, Any]]:
    """Uncompressed RLEs of a stack of binary masks.

    Args:
      masks: (N, H, W) bool (or 0/1) masks; with ``transposed=True`` (N, W, H), i.e. already in
        column-major order (saves a transpose).

    Returns:
      N dicts ``{"size": [H, W], "counts": list[int]}``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {masks.shape}")
    n = masks.shape[0]
    h, w = (masks.shape[2], masks.shape[1]) if transposed else masks.shape[1:]
    flat = (masks if transposed else masks.transpose(0, 2, 1)).reshape(n, h * w).astype(bool, copy=False)
    if n == 0:
        return []
    change = flat[:, 1:] != flat[:, :-1]
    rows, cols = np.nonzero(change)
    # Run boundaries per mask: 0, every change position + 1, h*w.
    starts = np.searchsorted(rows, np.arange(n + 1))
    out = []
    ends = cols + 1
    for i in range(n):
        b = ends[starts[i]:starts[i + 1]]
        bounds = np.concatenate([[0], b, [h * w]])
        counts = np.diff(bounds).tolist()
        if flat[i, 0]:
            counts = [0] + counts
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """An uncompressed RLE -> (H, W) bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}*{w}")
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of set pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE (``counts`` as a str), via pycocotools."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    out = mask_utils.frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out


def masks_to_coco_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool masks -> COCO compressed RLEs, encoded by pycocotools in one call."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks)
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    out = mask_utils.encode(fortran)
    for r in out:
        r["counts"] = r["counts"].decode("utf-8")
        r["size"] = [int(s) for s in r["size"]]
    return out

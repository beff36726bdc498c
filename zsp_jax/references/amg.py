"""Helpers for automatic-mask-generation parity tests and benchmarks.

* ``reference_pair``: a segment-anything ``Sam`` with every tensor random and the zsp_jax ``Sam``
  holding the same weights. The reference's ``pixel_mean`` / ``pixel_std`` buffers are put back
  to the config's values after randomisation: ``randomize_`` fills every float buffer, and
  random normalisation constants would make the reference preprocess images differently from
  ours (zsp_jax takes them from the config).
* ``sample_images``: natural photos from scikit-image (bundled with the package, no download)
  at small sizes, so that masks have structure.
* ``masks_of`` / ``match_records``: decode the records of either generator and pair reference
  and zsp_jax masks one-to-one by mask IoU (Hungarian assignment).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=4)
def reference_pair(config: Any, seed: int = 0) -> tuple[Any, Any]:
    """(segment-anything Sam (eval, random weights, real normalisation), zsp_jax Sam with the same weights)."""
    import torch

    from zsp_jax.references.sam import flax_sam_from_reference, reference_sam

    ref = reference_sam(config, seed=seed)
    with torch.no_grad():
        ref.pixel_mean.copy_(torch.tensor(config.pixel_mean, dtype=torch.float32).view(-1, 1, 1))
        ref.pixel_std.copy_(torch.tensor(config.pixel_std, dtype=torch.float32).view(-1, 1, 1))
    return ref, flax_sam_from_reference(ref, config)


_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def sample_images(sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """uint8 RGB photos resized (PIL bilinear) to the given (H, W) sizes, cycling through scikit-image's samples."""
    from PIL import Image
    from skimage import data

    out = []
    for i, (h, w) in enumerate(sizes):
        photo = getattr(data, _PHOTOS[i % len(_PHOTOS)])()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        out.append(np.asarray(Image.fromarray(photo[..., :3]).resize((w, h), Image.BILINEAR)))
    return out


def masks_of(records: list[dict[str, Any]]) -> np.ndarray:
    """(N, H, W) bool masks of AMG records in any output mode."""
    from zsp_jax.amg.rle import rle_to_mask

    out = []
    for r in records:
        seg = r["segmentation"]
        if isinstance(seg, np.ndarray):
            out.append(seg.astype(bool))
        elif isinstance(seg.get("counts"), str):
            from pycocotools import mask as mask_utils

            out.append(mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool))
        else:
            out.append(rle_to_mask(seg))
    if not out:
        return np.zeros((0, 0, 0), bool)
    return np.stack(out)


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU between two stacks of (H, W) bool masks (empty vs empty counts as 1)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclasses.dataclass
class Match:
    """One-to-one pairing of reference and zsp_jax records."""

    pairs: list[tuple[int, int]]  # (reference index, ours index) with IoU >= the threshold
    ious: np.ndarray  # IoU of every pair in ``pairs``
    n_ref: int
    n_ours: int

    @property
    def ref_fraction(self) -> float:
        return len(self.pairs) / max(self.n_ref, 1)

    @property
    def ours_fraction(self) -> float:
        return len(self.pairs) / max(self.n_ours, 1)


def match_records(ref: list[dict[str, Any]], ours: list[dict[str, Any]], *, min_iou: float = 0.99) -> Match:
    """Pairs masks one-to-one (Hungarian on mask IoU; ties broken towards the same prompt point)."""
    from scipy.optimize import linear_sum_assignment

    if not ref or not ours:
        return Match([], np.zeros(0), len(ref), len(ours))
    iou = mask_iou_matrix(masks_of(ref), masks_of(ours))
    same_point = np.array([[np.allclose(r["point_coords"], o["point_coords"]) for o in ours] for r in ref])
    # Masks of a random-weight model can be near-duplicates; prefer the pairing with the same prompt.
    rows, cols = linear_sum_assignment(-(iou + 1e-3 * same_point))
    keep = iou[rows, cols] >= min_iou
    pairs = [(int(r), int(c)) for r, c in zip(rows[keep], cols[keep])]
    return Match(pairs, iou[rows[keep], cols[keep]], len(ref), len(ours))

"""The figures of a comparison: relative errors of tensors, agreement of discrete outputs, mask pairing.

Each function takes the per-image outputs of both sides (numpy) and returns a ``Figure``: the worst
value over the images, the median, and how much was compared (``count``: elements, masks, pairs or
pixels), so that a comparison of nothing can be told from a pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Figure:
    """One component's figures.

    Attributes:
      worst: for tensors the largest element-wise relative error, for discrete outputs the lowest
        per-image agreement (NaN when nothing was compared).
      median: the median element-wise relative error, or the median per-image agreement.
      count: elements / masks / segment pairs / pixels compared (0 = nothing to compare).
      note: what the figure covers, when that needs saying.
    """

    worst: float
    median: float
    count: int
    note: str = ""


def tensor_figure(ours: Sequence[np.ndarray], reference: Sequence[np.ndarray], note: str = "") -> Figure:
    """Element-wise ``|ours - ref| / max|ref|`` per image (the parity tests' measure), over all images.

    Args:
      ours, reference: one array per image, equal shapes pairwise (any float dtype; compared in float64).

    Returns:
      ``Figure`` with worst = max and median over every element of every image.
    """
    errors = []
    for a, b in zip(ours, reference, strict=True):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: ours {a.shape}, reference {b.shape}")
        if b.size:
            errors.append((np.abs(a - b) / max(float(np.max(np.abs(b))), 1e-30)).ravel())
    if not errors:
        return Figure(float("nan"), float("nan"), 0, note)
    flat = np.concatenate(errors)
    return Figure(float(np.max(flat)), float(np.median(flat)), int(flat.size), note)


def fraction_figure(agreeing: Sequence[int], totals: Sequence[int], note: str = "") -> Figure:
    """Per-image agreement ``agreeing / total`` (images with a total of 0 are left out).

    Returns:
      ``Figure`` with worst = the lowest fraction, median over the images, count = sum of totals.
    """
    fractions = [a / t for a, t in zip(agreeing, totals, strict=True) if t > 0]
    if not fractions:
        return Figure(float("nan"), float("nan"), 0, note)
    return Figure(float(np.min(fractions)), float(np.median(fractions)), int(sum(totals)), note)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of two stacks of (H, W) bool masks (empty vs empty = 1)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclasses.dataclass(frozen=True)
class MaskPairs:
    """A one-to-one pairing of reference and our masks.

    Attributes:
      pairs: (reference index, our index) of every pair with IoU >= the threshold.
      ious: (len(pairs),) their IoU.
      n_reference, n_ours: masks on each side.
    """

    pairs: list[tuple[int, int]]
    ious: np.ndarray
    n_reference: int
    n_ours: int

    @property
    def both_ways(self) -> float:
        """The smaller of the fractions of reference masks and of our masks that found a pair (1.0 when
        neither side has a mask: callers decide whether that is a comparison)."""
        if self.n_reference == 0 and self.n_ours == 0:
            return 1.0
        return len(self.pairs) / max(self.n_reference, self.n_ours)


def pair_masks(reference: np.ndarray, ours: np.ndarray, *, min_iou: float = 0.99) -> MaskPairs:
    """Pairs (N, H, W) reference masks with (M, H, W) masks of ours one-to-one (Hungarian assignment
    on mask IoU), keeping pairs with IoU >= ``min_iou``."""
    from scipy.optimize import linear_sum_assignment

    if len(reference) == 0 or len(ours) == 0:
        return MaskPairs([], np.zeros(0), len(reference), len(ours))
    iou = mask_iou(reference, ours)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] >= min_iou
    pairs = [(int(r), int(c)) for r, c in zip(rows[keep], cols[keep])]
    return MaskPairs(pairs, iou[rows[keep], cols[keep]], len(reference), len(ours))

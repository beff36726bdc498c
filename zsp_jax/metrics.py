"""Segmentation metrics from a confusion matrix: the one definition of mIoU in zsp_jax.

The trainer's evaluation and the pseudo-label evaluation both accumulate a (C, C) confusion
matrix ``cm[target, prediction]`` over every pixel whose target is not the ignore label (255),
and derive everything from it, so their numbers are comparable by construction.

mIoU follows UniMatch (``util/utils.py: intersectionAndUnion`` summed over the set, then
``intersection / (union + 1e-10)`` averaged over **all** C classes): a class that appears in
neither the targets nor the predictions counts as IoU 0. On the real validation sets every
class appears, so this is the published number; on small subsets it penalises absent classes,
which is why ``summarize`` also reports ``miou_present`` (the mean over classes with a non-zero
union) — read that one for a handful of images.

Prediction values outside ``[0, C)`` (e.g. 255 = "no label" in a pseudo-label map) count as
wrong for the target's class and as nobody's prediction: they reduce recall, never precision.
``coverage`` is the fraction of valid target pixels that received a prediction in ``[0, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255
_EPS = 1e-10  # UniMatch's


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_LABEL
                     ) -> np.ndarray:
    """Host confusion matrix of one or many label maps.

    Args:
      pred: integer predictions, any shape; values outside [0, C) mean "no prediction".
      target: integer targets of the same shape; ``ignore_index`` pixels are skipped.
      num_classes: C.

    Returns:
      (C, C + 1) int64 counts ``cm[t, p]``; column C counts valid target pixels with no
      prediction in [0, C).
    """
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    target = np.asarray(target).astype(np.int64, copy=False).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target sizes differ: {pred.size} vs {target.size}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    t = target[valid]
    p = pred[valid]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    return np.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


def confusion_matrix_device(pred: jax.Array, target: jax.Array, num_classes: int, *,
                            valid: jax.Array | None = None, ignore_index: int = IGNORE_LABEL) -> jax.Array:
    """Jittable ``confusion_matrix``: (C, C + 1) int32 counts of a batch (sharded inputs are fine).

    Args:
      pred, target: integer arrays of the same shape.
      valid: optional bool mask of the same shape (e.g. the unpadded part of a padded batch);
        pixels where it is False are skipped as if their target were ``ignore_index``.

    int32 counts hold 2**31 pixels: sum batches on the host in int64 (``accumulate``).
    """
    c = num_classes
    ok = (target != ignore_index) & (target >= 0) & (target < c)
    if valid is not None:
        ok = ok & valid
    p = jnp.where((pred >= 0) & (pred < c), pred, c).astype(jnp.int32)
    idx = jnp.where(ok, target.astype(jnp.int32) * (c + 1) + p, c * (c + 1))  # last bin: skipped pixels
    counts = jnp.zeros((c * (c + 1) + 1,), jnp.int32).at[idx.ravel()].add(1)
    return counts[:-1].reshape(c, c + 1)


def accumulate(total: np.ndarray | None, cm: Any) -> np.ndarray:
    """``total + cm`` in int64 (``total`` None starts a sum)."""
    cm = np.asarray(jax.device_get(cm), np.int64)
    return cm.copy() if total is None else total + cm


def iou_per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, union, IoU) per class, each (C,), from a (C, C + 1) or (C, C) matrix."""
    cm = np.asarray(cm, np.int64)
    c = cm.shape[0]
    inter = np.diag(cm[:, :c]).astype(np.float64)
    union = cm.sum(axis=1) + cm[:, :c].sum(axis=0) - inter
    return inter, union.astype(np.float64), inter / (union + _EPS)


def summarize(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a confusion matrix (percentages, as UniMatch logs them).

    Returns a dict with ``miou`` (UniMatch: mean over all classes), ``miou_present`` (mean over
    classes with a non-zero union), ``pixel_accuracy`` (correct / valid target pixels),
    ``coverage`` (pixels with a prediction / valid target pixels), ``per_class`` (name -> IoU,
    None where the union is 0), ``pixels`` (valid target pixels) and ``class_pixels`` (target
    pixels per class).
    """
    cm = np.asarray(cm, np.int64)
    c = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a {c}-class confusion matrix")
    inter, union, iou = iou_per_class(cm)
    total = int(cm.sum())
    present = union > 0
    covered = int(cm[:, :c].sum())
    return {
        "miou": float(iou.mean() * 100.0),
        "miou_present": float(iou[present].mean() * 100.0) if present.any() else float("nan"),
        "pixel_accuracy": float(inter.sum() / total * 100.0) if total else float("nan"),
        "coverage": float(covered / total * 100.0) if total else float("nan"),
        "per_class": {n: (float(v * 100.0) if ok else None) for n, v, ok in zip(names, iou, present)},
        "pixels": total,
        "class_pixels": {n: int(v) for n, v in zip(names, cm.sum(axis=1))},
    }

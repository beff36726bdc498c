"""Quality of pseudo labels against ground truth: the trainer's mIoU, coverage, and a threshold sweep.

Every pseudo-label map with a ground-truth mask is compared pixel by pixel through
``zsp_jax.metrics`` (the confusion matrix the trainer's evaluation uses: ground truth 255 is
ignored; a pseudo label of 255 — no segment — counts as a miss for the true class). Two views
are reported (docs/labeller.md, quality):

* ``as_labelled``: uncovered pixels stay "no label": mIoU over covered pixels' decisions plus
  ``coverage``, the share of valid pixels that got a label;
* ``uncovered_as_background``: the same maps with uncovered pixels read as background.

``sweep_thresholds`` re-decides the no-class rule (cosine) from the per-segment records
(``label.write_segments``) for several thresholds without running the models again, so the
threshold can be tuned on labelled images.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsp_jax import metrics
from zsp_jax.data.decode import decode_mask


def _read_mask(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_mask(f.read(), path)


def _pair_matrix(label_file: str, gt_file: str, num_labels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        pred, gt = _read_mask(label_file), _read_mask(gt_file)
    except Exception as e:  # noqa: BLE001 - reported per image
        return None, f"{type(e).__name__}: {e}"
    if pred.shape != gt.shape:
        return None, f"pseudo label {pred.shape[::-1]} and ground truth {gt.shape[::-1]} (WxH) differ in size"
    return metrics.confusion_matrix(pred, gt, num_labels), None


def with_uncovered_as_background(cm: np.ndarray) -> np.ndarray:
    """(C, C + 1) -> the same counts with the "no prediction" column moved into background (column 0)."""
    c = cm.shape[0]
    out = cm.copy()
    out[:, 0] += out[:, c]
    out[:, c] = 0
    return out


def evaluate(pairs: Sequence[tuple[str, str, str]], class_names: Sequence[str], *, threads: int = 4
             ) -> dict[str, Any]:
    """Metrics of pseudo labels against ground truth.

    Args:
      pairs: (image name, pseudo-label PNG, ground-truth PNG) per image.
      class_names: names of the label values 0..C-1.

    Returns:
      {"images", "as_labelled": summarize(...), "uncovered_as_background": summarize(...),
       "per_image": [{"name", "miou_present", "coverage"}], "problems": [{"name", "reason"}]}.
    """
    c = len(class_names)
    total = None
    per_image, problems = [], []
    with cf.ThreadPoolExecutor(threads) as pool:
        for (name, _, _), (cm, err) in zip(pairs, pool.map(lambda p: _pair_matrix(p[1], p[2], c), pairs)):
            if err is not None:
                problems.append({"name": name, "reason": err})
                continue
            total = metrics.accumulate(total, cm)
            s = metrics.summarize(cm, class_names)
            per_image.append({"name": name, "miou_present": s["miou_present"], "coverage": s["coverage"]})
    if total is None:
        return {"images": 0, "problems": problems}
    return {"images": len(per_image), "as_labelled": metrics.summarize(total, class_names),
            "uncovered_as_background": metrics.summarize(with_uncovered_as_background(total), class_names),
            "per_image": per_image, "problems": problems}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of ``evaluate``'s result for the console."""
    if not result.get("images"):
        return "no image with ground truth to evaluate"
    a, b = result["as_labelled"], result["uncovered_as_background"]
    lines = [f"pseudo-label quality on {result['images']} images with ground truth",
             f"  as labelled:              mIoU {a['miou']:.2f} (classes present {a['miou_present']:.2f}), "
             f"pixel accuracy {a['pixel_accuracy']:.2f}, coverage {a['coverage']:.2f} %",
             f"  uncovered as background:  mIoU {b['miou']:.2f} (classes present {b['miou_present']:.2f}), "
             f"pixel accuracy {b['pixel_accuracy']:.2f}",
             "  per class (as labelled, IoU %):"]
    items = [f"{n}: {'-' if v is None else f'{v:.1f}'}" for n, v in a["per_class"].items()]
    for i in range(0, len(items), 6):
        lines.append("    " + ", ".join(items[i:i + 6]))
    if result["problems"]:
        lines.append(f"  {len(result['problems'])} image(s) not evaluated, e.g. {result['problems'][0]}")
    return "\n".join(lines)


def repaint(record: dict[str, Any], threshold: float, uncovered: int, paint_order: str = "area_desc") -> np.ndarray:
    """A label map from a segments record with the cosine no-class rule at ``threshold``.

    Segments the labeller already assigned to background (background prompts) stay background;
    the others take their best class when its cosine reaches the threshold.
    """
    from zsp_jax.data.pseudo_labels import segment_masks

    h, w = record["height"], record["width"]
    out = np.full((h, w), uncovered, np.uint8)
    segs = record["segments"]
    if not segs:
        return out
    masks = segment_masks(record)
    key = {"area_desc": lambda s: -s["area"], "area_asc": lambda s: s["area"],
           "iou_asc": lambda s: s["predicted_iou"]}[paint_order]
    order = sorted(range(len(segs)), key=lambda i: key(segs[i]))
    for i in order:
        s = segs[i]
        background_prompt = s["class"] == 0 and s["score"] > s["similarity"]
        cls = 0 if background_prompt or s["similarity"] < threshold else s["best_class"]
        out[masks[i]] = cls
    return out


def sweep_thresholds(items: Sequence[tuple[str, str, str]], thresholds: Sequence[float], class_names: Sequence[str],
                     *, uncovered: int = 255, paint_order: str = "area_desc", threads: int = 4) -> list[dict[str, Any]]:
    """mIoU (both views) per threshold, from per-segment records: items = (name, segments JSON, ground truth)."""
    c = len(class_names)

    def one(item: tuple[str, str, str]) -> list[np.ndarray] | None:
        _, seg_file, gt_file = item
        try:
            with open(seg_file, encoding="utf-8") as f:
                record = json.load(f)
            gt = _read_mask(gt_file)
        except Exception:  # noqa: BLE001 - skipped (the plain evaluation reports unreadable files)
            return None
        return [metrics.confusion_matrix(repaint(record, t, uncovered, paint_order), gt, c) for t in thresholds]

    totals: list[np.ndarray | None] = [None] * len(thresholds)
    n = 0
    with cf.ThreadPoolExecutor(threads) as pool:
        for cms in pool.map(one, items):
            if cms is None:
                continue
            n += 1
            totals = [metrics.accumulate(t, cm) for t, cm in zip(totals, cms)]
    out = []
    for t, cm in zip(thresholds, totals):
        if cm is None:
            continue
        a = metrics.summarize(cm, class_names)
        b = metrics.summarize(with_uncovered_as_background(cm), class_names)
        out.append({"threshold": t, "images": n, "miou": a["miou"], "miou_present": a["miou_present"],
                    "coverage": a["coverage"], "miou_uncovered_as_background": b["miou"]})
    return out


def evaluation_pairs(out_dir: str, entries: dict[str, dict[str, Any]], gt_of: dict[str, str], kind: str = "label"
                     ) -> list[tuple[str, str, str]]:
    """(name, output file, ground truth) for finished images that have ground truth."""
    pairs = []
    for name, gt in sorted(gt_of.items()):
        e = entries.get(name)
        if not e or e.get("status") != "ok" or not gt or not os.path.isfile(gt):
            continue
        label = os.path.join(out_dir, e["label"])  # labels/<relpath>.png, as the job wrote it
        if kind == "segments":
            relpath = os.path.relpath(label, os.path.join(out_dir, "labels"))
            label = os.path.join(out_dir, "segments", os.path.splitext(relpath)[0] + ".json")
        pairs.append((name, label, gt))
    return pairs

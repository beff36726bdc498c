"""COCO 2017 instance annotations -> 81-class semantic masks (UniMatch's layout), with pycocotools.

Each image gets ``<root>/masks/<stem>.png``, a grayscale PNG: 0 background, ``i`` for the
``i``-th thing category in COCO id order (``classes.COCO_CATEGORY_IDS``), 255 ignore.

Choices (UniMatch ships preprocessed masks without saying how they were made):
* overlapping instances: painted from the largest to the smallest area, so a small object in
  front of a large one keeps its pixels;
* crowd annotations (``iscrowd=1``, loose regions around groups): 255 (ignore) by default,
  or their class with ``crowd="class"``; painted before the individual instances, which win;
* an image without annotations gets an all-background mask.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from zsp_jax.data import classes, decode
from zsp_jax.utils import io

_COCO: Any = None  # the loaded annotations, shared with forked workers (copy-on-write)


def category_to_class() -> dict[int, int]:
    """COCO category id -> class index 1..80."""
    return {cid: i + 1 for i, cid in enumerate(classes.COCO_CATEGORY_IDS)}


def semantic_mask(coco: Any, image_id: int, crowd: str = "ignore") -> np.ndarray:
    """uint8 (H, W) class-index mask of one image from a ``pycocotools.coco.COCO`` index."""
    info = coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    mask = np.zeros((h, w), np.uint8)
    lut = category_to_class()
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    crowds = [a for a in anns if a.get("iscrowd", 0)]
    things = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0.0)))
    for ann in crowds + things:
        if ann["category_id"] not in lut:
            continue
        m = coco.annToMask(ann).astype(bool)
        value = 255 if (ann.get("iscrowd", 0) and crowd == "ignore") else lut[ann["category_id"]]
        mask[m] = value
    return mask


def _write_one(args: tuple[int, str, str]) -> str:
    image_id, out_path, crowd = args
    if os.path.isfile(out_path):
        return out_path
    io.write_bytes_atomic(out_path, decode.encode_png(semantic_mask(_COCO, image_id, crowd)))
    return out_path


def write_masks(annotation_file: str, mask_dir: str, *, crowd: str = "ignore", workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> int:
    """Writes ``<mask_dir>/<stem>.png`` for every image of ``annotation_file``; returns how many images.

    Existing masks are kept (a killed run resumes); each file is written atomically. Workers are
    forked after the annotations are loaded, so they share them instead of each loading the JSON.
    With ``workers > 1`` call it from a process that has not started JAX (as ``tools/prepare_coco.py``
    does): forking a process whose JAX runtime threads are running can deadlock the children.
    """
    global _COCO
    from pycocotools.coco import COCO

    if crowd not in ("ignore", "class"):
        raise ValueError(f"crowd={crowd!r}: expected 'ignore' or 'class'")
    _COCO = COCO(annotation_file)
    jobs = [(img_id, os.path.join(mask_dir, os.path.splitext(info["file_name"])[0] + ".png"), crowd)
            for img_id, info in sorted(_COCO.imgs.items())]
    os.makedirs(mask_dir, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            _write_one(job)
            if progress:
                progress(1)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=64):
                if progress:
                    progress(1)
    return len(jobs)

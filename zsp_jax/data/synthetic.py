"""A small generated dataset in the VOC 2012 layout, for tests, ``configs/smoke.py`` and benchmarks.

Each image is a textured background with a few textured shapes (ellipses, rectangles,
triangles); each shape's class decides its colour and stripe pattern, so the classes can be
told apart. Masks hold the class of each pixel, with a 255 band on shape borders like the VOC
annotations. The layout is the one ``VocLayout`` reads::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png       palette PNG (train + val), like VOC's fine masks
    <root>/SegmentationClassAug/<id>.png    grayscale PNG (every image), like SBD's
    <root>/ImageSets/Segmentation/{train,val,trainval}.txt

A ``.complete`` marker is written last; ``make_voc_like`` skips the work when it finds one with
the same parameters, and starts over otherwise (so a killed generation is redone, not trusted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from zsp_jax.data import decode
from zsp_jax.utils import io

_MARKER = ".complete"


def voc_palette() -> np.ndarray:
    """The standard VOC colour map, (256, 3) uint8 (index 255 is the 'void' colour 224,224,192)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _texture(rng: np.random.Generator, h: int, w: int, color: np.ndarray, freq: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)
    noise = rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    img = color[None, None, :].astype(np.float32) * (0.75 + 0.25 * stripes[..., None]) + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(rng: np.random.Generator, h: int, w: int, num_classes: int,
               max_shapes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic example: uint8 image (h, w, 3) and uint8 mask (h, w) in [0, num_classes) or 255."""
    class_rng = np.random.default_rng(1234)  # fixed per-class appearance across images
    colors = class_rng.integers(30, 226, (num_classes, 3))
    freqs = class_rng.uniform(0.05, 0.6, num_classes)
    angles = class_rng.uniform(0, np.pi, num_classes)
    bg = _texture(rng, h, w, colors[0], freqs[0], angles[0])
    image, mask = bg, np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        c = int(rng.integers(1, num_classes)) if num_classes > 1 else 0
        shape = np.zeros((h, w), np.uint8)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        ry, rx = int(rng.integers(h // 8 + 1, h // 3 + 2)), int(rng.integers(w // 8 + 1, w // 3 + 2))
        kind = rng.integers(3)
        if kind == 0:
            cv2.ellipse(shape, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif kind == 1:
            cv2.rectangle(shape, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
        else:
            pts = np.stack([cx + rng.integers(-rx, rx + 1, 3), cy + rng.integers(-ry, ry + 1, 3)], -1)
            cv2.fillPoly(shape, [pts.astype(np.int32)], 1)
        inside = shape.astype(bool)
        tex = _texture(rng, h, w, colors[c], freqs[c], angles[c])
        image = np.where(inside[..., None], tex, image)
        mask = np.where(inside, c, mask).astype(np.uint8)
        border = cv2.morphologyEx(shape, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
        mask[border & (mask != 255)] = 255
    return image, mask


def colour_cast(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A per-image photometric change, as between photos: each channel scaled by U(1 - s, 1 + s) and
    shifted by U(-64 s, 64 s). uint8 (H, W, 3) in and out."""
    gain = rng.uniform(1.0 - strength, 1.0 + strength, 3)
    shift = rng.uniform(-64.0 * strength, 64.0 * strength, 3)
    return np.clip(image.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def make_voc_like(root: str, *, num_train: int = 24, num_val: int = 8, num_aug_only: int = 0,
                  num_classes: int = 21, size_range: tuple[int, int] = (64, 160), seed: int = 0,
                  jpeg_quality: int = 90, cast: float = 0.0) -> str:
    """Writes a VOC-layout dataset under ``root``; returns ``root``.

    Args:
      num_train / num_val: images in ``ImageSets/Segmentation/{train,val}.txt``, with fine masks.
      num_aug_only: extra images with only a ``SegmentationClassAug`` mask (like SBD's); these
        make ``train_aug`` larger than ``train``.
      num_classes: mask values are in ``[0, num_classes)`` plus 255 borders.
      size_range: each image's height and width are drawn from this range (inclusive).
      seed: the same arguments give the same files.
      cast: strength of a random per-image ``colour_cast`` (0: none), so that the class colours vary
        between images as between photos (a task on which a handful of labelled images do not show
        every appearance).
    """
    params = dict(num_train=num_train, num_val=num_val, num_aug_only=num_aug_only, num_classes=num_classes,
                  size_range=list(size_range), seed=seed, jpeg_quality=jpeg_quality)
    if cast:
        params["cast"] = cast
    marker = os.path.join(root, _MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    ids = {"train": [f"2000_{i:06d}" for i in range(num_train)],
           "val": [f"2001_{i:06d}" for i in range(num_val)],
           "aug": [f"2002_{i:06d}" for i in range(num_aug_only)]}
    for part, names in ids.items():
        for name in names:
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
            image, mask = make_image(rng, h, w, num_classes)
            if cast:
                image = colour_cast(image, rng, cast)
            io.write_bytes_atomic(os.path.join(root, "JPEGImages", name + ".jpg"),
                                  decode.encode_jpeg(image, jpeg_quality))
            io.write_bytes_atomic(os.path.join(root, "SegmentationClassAug", name + ".png"), decode.encode_png(mask))
            if part != "aug":
                io.write_bytes_atomic(os.path.join(root, "SegmentationClass", name + ".png"),
                                      decode.encode_png(mask, palette))
    sets = os.path.join(root, "ImageSets", "Segmentation")
    io.write_text_atomic(os.path.join(sets, "train.txt"), "".join(n + "\n" for n in ids["train"]))
    io.write_text_atomic(os.path.join(sets, "val.txt"), "".join(n + "\n" for n in ids["val"]))
    io.write_text_atomic(os.path.join(sets, "trainval.txt"), "".join(n + "\n" for n in ids["train"] + ids["val"]))
    io.write_json_atomic(marker, params)
    return root


def make_pseudo_labels(examples: Sequence[Any], labels_dir: str, *, num_classes: int, corrupt_fraction: float = 0.3,
                       uncovered_fraction: float = 0.0, seed: int = 0, segments_dir: str | None = None
                       ) -> dict[str, Any]:
    """Stand-in zero-shot labels with a known error rate, from ground truth (tests, smoke runs, benchmarks).

    Each connected region of one class in an example's mask is a "segment"; with probability
    ``corrupt_fraction`` its label is replaced by another random class, with probability
    ``uncovered_fraction`` it is left uncovered (255); the mask's 255 pixels stay 255. Written where
    the labeller writes (``pseudo_labels.label_relpath``): palette PNGs in ``labels_dir`` and, with
    ``segments_dir``, per-segment records (COCO RLE, descending area) as the labeller's.

    Args:
      examples: ``readers.Example`` with masks (e.g. the unlabelled images, resolved as labelled).
      labels_dir / segments_dir: output folders.
      num_classes: C; corrupted labels are drawn from the other C - 1 classes.
      seed: with an example's name, fixes its draws.

    Returns:
      ``{"images", "segments", "corrupted", "uncovered", "pixel_accuracy"}`` (accuracy over the
      covered, non-ignore pixels).
    """
    import zlib

    from pycocotools import mask as mask_utils

    from zsp_jax.data import pseudo_labels

    palette = voc_palette()
    stats = {"images": 0, "segments": 0, "corrupted": 0, "uncovered": 0}
    right = total = 0
    for ex in examples:
        with open(ex.mask, "rb") as f:
            gt = decode.decode_mask(f.read(), ex.mask)
        rng = np.random.default_rng([seed, zlib.crc32(ex.name.encode())])
        out = np.full_like(gt, 255)
        segments = []
        for c in np.unique(gt):
            if c == 255:
                continue
            n, comp = cv2.connectedComponents((gt == c).astype(np.uint8), connectivity=4)
            for k in range(1, n):
                region = comp == k
                label, u = int(c), rng.random()
                if u < uncovered_fraction:
                    stats["uncovered"] += 1
                    continue
                if u < uncovered_fraction + corrupt_fraction and num_classes > 1:
                    label = int(rng.choice([x for x in range(num_classes) if x != c]))
                    stats["corrupted"] += 1
                out[region] = label
                stats["segments"] += 1
                right += int(region.sum()) if label == c else 0
                total += int(region.sum())
                if segments_dir is not None:
                    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
                    ys, xs = np.nonzero(region)
                    segments.append({"segmentation": {"size": [int(gt.shape[0]), int(gt.shape[1])],
                                                      "counts": rle["counts"].decode()},
                                     "area": int(region.sum()),
                                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                              int(ys.max() - ys.min() + 1)],
                                     "class": label, "similarity": float(rng.uniform(0.2, 0.35)),
                                     "predicted_iou": float(rng.uniform(0.88, 1.0)),
                                     "stability_score": float(rng.uniform(0.95, 1.0))})
        io.write_bytes_atomic(os.path.join(labels_dir, pseudo_labels.label_relpath(ex.name)),
                              decode.encode_png(out, palette))
        if segments_dir is not None:
            segments.sort(key=lambda s: -s["area"])
            io.write_json_atomic(os.path.join(segments_dir, pseudo_labels.label_relpath(ex.name, ".json")),
                                 {"image": ex.name, "height": int(gt.shape[0]), "width": int(gt.shape[1]),
                                  "segments": segments}, indent=None)
        stats["images"] += 1
    stats["pixel_accuracy"] = right / total if total else float("nan")
    return stats

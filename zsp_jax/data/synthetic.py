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


def make_voc_like(root: str, *, num_train: int = 24, num_val: int = 8, num_aug_only: int = 0,
                  num_classes: int = 21, size_range: tuple[int, int] = (64, 160), seed: int = 0,
                  jpeg_quality: int = 90) -> str:
    """Writes a VOC-layout dataset under ``root``; returns ``root``.

    Args:
      num_train / num_val: images in ``ImageSets/Segmentation/{train,val}.txt``, with fine masks.
      num_aug_only: extra images with only a ``SegmentationClassAug`` mask (like SBD's); these
        make ``train_aug`` larger than ``train``.
      num_classes: mask values are in ``[0, num_classes)`` plus 255 borders.
      size_range: each image's height and width are drawn from this range (inclusive).
      seed: the same arguments give the same files.
    """
    params = dict(num_train=num_train, num_val=num_val, num_aug_only=num_aug_only, num_classes=num_classes,
                  size_range=list(size_range), seed=seed, jpeg_quality=jpeg_quality)
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

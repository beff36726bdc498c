"""A preview image of the training input: what the augmentations do, for a person to look at.

One row per element: the labelled crop with its mask overlaid (255 = ignore shown white), then
for the unlabelled image the weak view, the two strong views with their CutMix boxes outlined
and the padding (ignore mask) hatched, and the mix stream's weak view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from zsp_jax.data import augment
from zsp_jax.data.synthetic import voc_palette

_COLUMNS = ("labelled + mask", "weak", "strong 1 + box", "strong 2 + box", "mix weak")


def _to_uint8(normalised: np.ndarray) -> np.ndarray:
    x = (np.asarray(normalised, np.float32) * augment.STD + augment.MEAN) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    pal = voc_palette().astype(np.float32)
    pal[255] = 255.0
    colour = pal[mask]
    out = image.astype(np.float32)
    labelled = mask > 0
    out[labelled] = (1 - alpha) * out[labelled] + alpha * colour[labelled]
    return out.astype(np.uint8)


def _hatch(image: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    out = image.copy()
    yy, xx = np.mgrid[0:ignore.shape[0], 0:ignore.shape[1]]
    stripes = ((yy + xx) // 4) % 2 == 0
    out[(ignore == 255) & stripes] = (255, 0, 255)
    return out


def _box_outline(img: Image.Image, box: np.ndarray) -> None:
    ys, xs = np.nonzero(box)
    if len(ys):
        ImageDraw.Draw(img).rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                                      outline=(255, 255, 0), width=2)


def make_preview(batch: dict[str, Any], n: int) -> Image.Image:
    """Grid image of the first ``n`` elements of a finalized batch (``device_augment.finalize`` output)."""
    lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["unlabeled_mix"]
    n = min(n, lab["image"].shape[0])
    size = lab["image"].shape[1]
    pad, head = 4, 16
    grid = Image.new("RGB", (len(_COLUMNS) * (size + pad) + pad, head + n * (size + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(_COLUMNS):
        draw.text((pad + c * (size + pad), 2), title, fill=(230, 230, 230))
    for r in range(n):
        ignore = np.asarray(unl["ignore_mask"][r])
        tiles = [
            Image.fromarray(_overlay(_to_uint8(lab["image"][r]), np.asarray(lab["mask"][r]).astype(np.uint8))),
            Image.fromarray(_hatch(_to_uint8(unl["image_w"][r]), ignore)),
            Image.fromarray(_hatch(_to_uint8(unl["image_s1"][r]), ignore)),
            Image.fromarray(_hatch(_to_uint8(unl["image_s2"][r]), ignore)),
            Image.fromarray(_hatch(_to_uint8(mix["image_w"][r]), np.asarray(mix["ignore_mask"][r]))),
        ]
        _box_outline(tiles[2], np.asarray(unl["cutmix_box1"][r]))
        _box_outline(tiles[3], np.asarray(unl["cutmix_box2"][r]))
        for c, tile in enumerate(tiles):
            grid.paste(tile, (pad + c * (size + pad), head + pad + r * (size + pad)))
    return grid

"""The data stage: run the training input for a few batches and draw what the augmentations do.

``run_data_stage(config)`` (stage ``data`` of ``zsp_jax.main``): checks the data (generated data
first, TFDS build or file scan, bad-input report), runs ``data_stage.num_batches`` batches of the
training input through ``device_augment.finalize`` with a progress bar, and writes
``<workdir>/preview.png`` (``make_preview``), ``input_state.json`` (the iterator position) and
``data_stage.json`` (a summary with the measured rate).

One row per element: the labelled crop with its mask overlaid (255 = ignore shown white), then
for the unlabelled image the weak view, the two strong views with their CutMix boxes outlined
and the padding (ignore mask) hatched, and the mix stream's weak view.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from PIL import Image, ImageDraw

from zsp_jax.data import augment, bad_input, device_augment, pipeline
from zsp_jax.data import config as data_config
from zsp_jax.data.inputs import make_train_pipeline, prepare_synthetic, training_sources
from zsp_jax.data.synthetic import voc_palette
from zsp_jax.utils import io

log = logging.getLogger(__name__)

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


def _available_pseudo_labels(config: ml_collections.ConfigDict) -> str:
    """``data.pseudo_labels`` if it names an existing folder, else "" (the data stage runs before the label
    stage writes them: the input is then shown without them, and training checks them when it starts)."""
    labels = config.data.get("pseudo_labels", "")
    if labels and os.path.isdir(os.path.expanduser(labels)):
        return labels
    if labels:
        print(f"data: pseudo labels {labels} not there yet (the label stage writes them); the input is shown "
              f"without them")
    return ""


def run_data_stage(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the data stage; returns (and writes to ``<workdir>/data_stage.json``) a summary."""
    data_config.validate(config)
    workdir = os.path.expanduser(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.get("synthetic"):
        prepare_synthetic(config)
    srcs = training_sources(config, pseudo_labels=_available_pseudo_labels(config))
    report = os.path.join(workdir, "bad_input.json")
    bad_input.write_report(report, srcs.problems, f"split {config.data.split} of {config.data.dataset}")
    if srcs.problems:
        log.warning("%d bad input file(s) left out (listed in %s), e.g. %s: %s", len(srcs.problems), report,
                    srcs.problems[0].path, srcs.problems[0].reason)
    train = make_train_pipeline(config, srcs)
    print(f"data: {srcs.origin}")
    print(f"input: {train.describe()}; strong augmentations on {config.data.strong_aug}")
    finalize = jax.jit(device_augment.finalize)
    it = iter(train)
    n = config.data_stage.num_batches
    first = None
    t0 = time.perf_counter()
    t_first = None
    with tqdm.tqdm(total=n, desc="input batches", unit="batch") as bar:
        for _ in range(n):
            host = next(it)
            out = jax.block_until_ready(finalize(host))
            if first is None:
                first, t_first = out, time.perf_counter()
            bar.update(1)
    elapsed = time.perf_counter() - t0
    rate = (n - 1) / (time.perf_counter() - t_first) if n > 1 else None
    pipeline.save_state(it, os.path.join(workdir, "input_state.json"))
    if hasattr(it, "close"):
        it.close()
    preview_path = None
    if first is not None and config.data_stage.preview_images:
        preview_path = os.path.join(workdir, "preview.png")
        img = make_preview(jax.tree.map(np.asarray, first), config.data_stage.preview_images)
        with io.atomic_path(preview_path) as tmp:
            img.save(tmp, format="PNG")
    summary = {
        "labeled": train.num_labeled, "unlabeled": train.num_unlabeled, "steps_per_epoch": train.steps_per_epoch,
        "batches": n, "seconds": round(elapsed, 2),
        "batches_per_s_after_first": None if rate is None else round(rate, 3),
        "bad_inputs": len(srcs.problems), "bad_input_report": report, "preview": preview_path,
        "shapes": None if first is None else jax.tree.map(lambda x: list(x.shape), first),
    }
    io.write_json_atomic(os.path.join(workdir, "data_stage.json"), summary)
    rate_s = "" if rate is None else f", {rate:.2f} batches/s after the first"
    print(f"done: {n} batches in {elapsed:.1f} s{rate_s}; {len(srcs.problems)} bad input file(s) left out "
          f"({report})" + (f"; preview {preview_path}" if preview_path else ""))
    return summary

"""The labeller's output folder: per-image files, manifests, settings; every file written atomically.

Layout of ``<out>`` (``relpath`` = ``zsp_jax.data.pseudo_labels.label_relpath(name)`` without
its suffix, e.g. ``JPEGImages/2007_000033``; images whose names differ only by extension keep it,
``x.jpg`` -> ``x.jpg``, so that ``x.jpg`` and ``x.png`` each get their files):

    labels/<relpath>.png          palette PNG (VOC colours), 0 background, 1..N classes, 255 ignore;
                                  the trainer reads these (data.pseudo_labels)
    confidence/<relpath>.png      8-bit grey: winning segment's score x 255 (label.write_confidence)
    segments/<relpath>.json       {"image", "height", "width", "segments": [{"segmentation": COCO RLE,
                                  "class", "best_class", "similarity", "score", "predicted_iou",
                                  "stability_score", "bbox" [x, y, w, h], "area"}]} (label.write_segments)
    overlays/<relpath>.jpg        the image with its label blended in (label.write_overlays)
    manifest/<p>-of-<P>.jsonl     one line per finished image, appended by process p of P
    manifest.jsonl                all processes' lines, merged at the end
    label_settings.json           what decides a label (options, classes, checkpoints); a rerun into the
                                  same folder with other settings is refused
    classes.json                  label values, names, prompts and palette colours
    summary.json, eval.json, report.html, report/   end-of-run summary, quality, report

An image counts as finished when its manifest line exists; the line is appended (and synced)
only after all of the image's files are in place, so a kill at any moment leaves finished
images finished and no half-written file at a final name (the temporary files a kill can
leave, ``.tmp-*``, are removed at the next start).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from zsp_jax.data.decode import encode_jpeg, encode_png
from zsp_jax.data.pseudo_labels import label_relpath
from zsp_jax.data.synthetic import voc_palette
from zsp_jax.utils import io

PALETTE = voc_palette()


def output_paths(out_dir: str, name: str, *, confidence: bool, segments: bool, overlays: bool,
                 keep_extension: bool = False) -> dict[str, str]:
    """Every file one image gets, by kind (``keep_extension`` for names in ``pseudo_labels.clashing_names``)."""
    def path(folder: str, suffix: str) -> str:
        return os.path.join(out_dir, folder, label_relpath(name, suffix, keep_extension=keep_extension))

    paths = {"label": path("labels", ".png")}
    if confidence:
        paths["confidence"] = path("confidence", ".png")
    if segments:
        paths["segments"] = path("segments", ".json")
    if overlays:
        paths["overlay"] = path("overlays", ".jpg")
    return paths


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image with the label's palette colours blended in (ignore pixels untouched)."""
    colours = PALETTE[label].astype(np.float32)
    out = image.astype(np.float32)
    painted = label != 255
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def colourize(label: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 palette colours."""
    return PALETTE[label]


def write_image_outputs(paths: dict[str, str], name: str, result: Any, image: np.ndarray | None) -> None:
    """Writes one image's files (``result``: a ``labeller.ImageResult``), each atomically."""
    io.write_bytes_atomic(paths["label"], encode_png(result.label, PALETTE))
    if "confidence" in paths and result.confidence is not None:
        io.write_bytes_atomic(paths["confidence"], encode_png(result.confidence))
    if "segments" in paths:
        h, w = result.label.shape
        io.write_json_atomic(paths["segments"], {"image": name, "height": h, "width": w,
                                                 "segments": result.segments}, indent=None)
    if "overlay" in paths and image is not None:
        from PIL import Image

        small = np.asarray(Image.fromarray(result.label).resize((image.shape[1], image.shape[0]), Image.NEAREST))
        io.write_bytes_atomic(paths["overlay"], encode_jpeg(overlay(image, small)))


class Manifest:
    """This process's append-only manifest, ``manifest/<p>-of-<P>.jsonl`` (thread-safe appends)."""

    def __init__(self, out_dir: str, process_index: int, process_count: int):
        self.path = os.path.join(out_dir, "manifest", f"{process_index:03d}-of-{process_count:03d}.jsonl")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_manifests(out_dir: str) -> dict[str, dict[str, Any]]:
    """Every image's latest manifest entry, from all processes' files (a torn last line is ignored)."""
    folder = os.path.join(out_dir, "manifest")
    entries: dict[str, dict[str, Any]] = {}
    if not os.path.isdir(folder):
        return entries
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: its image was not finished
                if isinstance(e, dict) and "name" in e:
                    entries[e["name"]] = e
    return entries


def write_merged_manifest(out_dir: str, entries: Iterable[dict[str, Any]]) -> str:
    path = os.path.join(out_dir, "manifest.jsonl")
    text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in sorted(entries, key=lambda e: e["name"]))
    io.write_text_atomic(path, text)
    return path


def remove_stale_temporaries(out_dir: str) -> int:
    """Deletes ``.tmp-*`` files a killed run left under ``out_dir``; returns how many."""
    removed = 0
    for dirpath, _, files in os.walk(out_dir):
        for f in files:
            if f.startswith(".tmp-"):
                try:
                    os.remove(os.path.join(dirpath, f))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def check_settings(out_dir: str, settings: dict[str, Any], *, overwrite: bool = False) -> None:
    """Writes ``label_settings.json``, or refuses when the folder holds labels made with other settings."""
    path = os.path.join(out_dir, "label_settings.json")
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings:
            diff = settings_differences(old, settings)
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ValueError(f"{out_dir} holds pseudo labels made with other settings ({shown}); use another output "
                             "folder, the earlier settings, or --overwrite (label.overwrite) to start over there")
        return
    if overwrite and os.path.isdir(os.path.join(out_dir, "manifest")):
        import shutil

        shutil.rmtree(os.path.join(out_dir, "manifest"))
    io.write_json_atomic(path, settings)


def settings_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``"options.threshold: 0.2 before, 0.25 now"`` for every leaf that differs between two settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {'absent' if key not in old else repr(old[key])} before, "
                           f"{'absent' if key not in new else repr(new[key])} now")
            else:
                out += settings_differences(old[key], new[key], name)
        return out
    if old == new:
        return []
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return [f"{prefix}: {short(old)} before, {short(new)} now"]


def write_classes(out_dir: str, classes: Any) -> None:
    info = classes.to_json()
    info["palette"] = [PALETTE[i].tolist() for i in range(classes.num_labels)] + [PALETTE[255].tolist()]
    info["ignore"] = 255
    io.write_json_atomic(os.path.join(out_dir, "classes.json"), info)

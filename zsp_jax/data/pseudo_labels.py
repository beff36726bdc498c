"""Where pseudo-label maps live, shared by the labeller (writer) and the trainer (reader).

The labeller writes one palette PNG per image (``decode.encode_png`` with the VOC palette,
class indices, 255 = ignore) at ``<labels_dir>/<relpath>``, where ``relpath`` is the image's
``Example.name`` with its extension replaced by ``.png``: ``JPEGImages/2007_000033.jpg`` ->
``JPEGImages/2007_000033.png``; a user folder's ``trip/day1/img.JPG`` -> ``trip/day1/img.png``.
Images whose names differ only by extension (``x.jpg`` beside ``x.png``) keep their extension
instead, so that each gets its own map: ``x.jpg.png`` and ``x.png.png`` (``clashing_names``).
Readers find a map with ``find_label``: the extension-keeping name first, then the plain one, so
the trainer follows the rule without knowing which images clashed.

The trainer's side: ``check_pseudo_labels`` checks every map before training (missing,
undecodable, colour, out-of-range or mis-sized maps are bad input under
``config.data.on_bad_input``), ``WithPseudoLabels`` adds each map's bytes to the unlabelled
records, and ``read_segments`` / ``segment_masks`` read the labeller's per-segment records
(``<labels root>/segments/<relpath>.json``, COCO RLE) for enhanced-label option C.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def label_relpath(name: str, suffix: str = ".png", *, keep_extension: bool = False) -> str:
    """The pseudo-label map's path relative to the labels folder, for an image ``name`` (POSIX form).

    ``keep_extension``: ``x.jpg`` -> ``x.jpg.png`` (for names in ``clashing_names``) instead of ``x.png``.
    """
    path = name.replace(os.sep, "/")
    stem = path if keep_extension else os.path.splitext(path)[0]
    if not stem or stem.startswith("/") or ".." in stem.split("/"):
        raise ValueError(f"image name {name!r} cannot be mapped inside a labels folder")
    return stem + suffix


def clashing_names(names: Iterable[str]) -> set[str]:
    """The names that share their extension-less path with another name (``a/x.jpg`` and ``a/x.png``):
    their outputs keep the extension (``label_relpath(..., keep_extension=True)``)."""
    by_stem: dict[str, list[str]] = {}
    for n in names:
        by_stem.setdefault(label_relpath(n), []).append(n)
    return {n for group in by_stem.values() if len(group) > 1 for n in group}


def find_label(folder: str, name: str, suffix: str = ".png") -> str:
    """The file of image ``name`` in a labels-like ``folder`` (labels, segments, ground truth): the
    extension-keeping name if that file exists, else the plain one (which may not exist)."""
    root = os.path.abspath(os.path.expanduser(folder))
    kept = os.path.join(root, label_relpath(name, suffix, keep_extension=True))
    return kept if os.path.isfile(kept) else os.path.join(root, label_relpath(name, suffix))


# --------------------------------------------------------------------------------------------- reading
# The trainer's side: label maps into the training stream (checked before training), and the
# labeller's per-segment records for the relabelling of enhanced-label option C.

SEGMENTS_DIRNAME = "segments"


def label_path(labels_dir: str, name: str) -> str:
    """Absolute path of image ``name``'s pseudo-label map inside ``labels_dir`` (``find_label``)."""
    return find_label(labels_dir, name)


def check_pseudo_label(example: Any, num_classes: int | None, exif: bool) -> tuple[int, int]:
    """Checks one unlabelled example's map (``example.mask`` = the map's path) against its image.

    The map is decoded fully (single channel, values < ``num_classes`` or 255); the image only
    to its header. Returns the image (H, W); raises ``BadInputError`` naming the map.
    """
    from zsp_jax.data import decode
    from zsp_jax.data.bad_input import BadInputError

    if not os.path.isfile(example.mask):
        raise BadInputError(example.mask, f"pseudo-label map of {example.name} missing (the labeller writes one "
                                          f"per unlabelled image; set config.data.pseudo_labels to its folder)")
    with open(example.mask, "rb") as f:
        label = decode.decode_mask(f.read(), example.mask, num_classes=num_classes)
    h, w = decode.image_size(example.image, exif=exif)
    if label.shape != (h, w):
        raise BadInputError(example.mask, f"pseudo-label map size {label.shape[1]}x{label.shape[0]} (WxH) differs "
                                          f"from its image's {w}x{h}")
    return h, w


def check_pseudo_labels(examples: Sequence[Any], labels_dir: str, *, num_classes: int, exif: bool = False,
                        cache_path: str | None = None, progress: Any = None) -> tuple[list[Any], list[Any]]:
    """Checks every unlabelled example's pseudo-label map before training.

    Args:
      examples: ``readers.Example`` of the unlabelled set (their ``image`` paths exist).
      labels_dir: the labeller's output folder (``config.data.pseudo_labels``).
      num_classes: valid map values are ``[0, num_classes)`` and 255.
      exif: the images are displayed with their EXIF orientation (plain folders).
      cache_path / progress: as ``scan.scan_examples`` (results of unchanged files are cached).

    Returns:
      (names of the examples whose map is usable, ``bad_input.Problem`` per bad or missing map).
    """
    from zsp_jax.data import readers, scan

    probes = [readers.Example(e.name, e.image, label_path(labels_dir, e.name)) for e in examples]
    res = scan.scan_examples(probes, num_classes=num_classes, exif=exif, cache_path=cache_path, progress=progress,
                             check=check_pseudo_label, kind="pseudo_label")
    return [e.name for e in res.good], res.problems


class WithPseudoLabels:
    """A Grain source whose records also carry the pseudo-label map's bytes.

    Wraps any source of ``{"name", "image", "mask"}`` records (``sources.FileSource``,
    ``sources.TfdsSource``) and adds ``pseudo_label`` (the PNG's bytes) and
    ``pseudo_label_path`` (for error messages). Picklable (holds a path).
    """

    def __init__(self, source: Any, labels_dir: str):
        self._source = source
        self._labels_dir = os.path.abspath(os.path.expanduser(labels_dir))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = dict(self._source[index])
        path = label_path(self._labels_dir, rec["name"])
        try:
            with open(path, "rb") as f:
                rec["pseudo_label"] = f.read()
        except OSError:
            rec["pseudo_label"] = b""  # decoded as a bad file: an error, or blanked under "skip"
        rec["pseudo_label_path"] = path
        return rec

    def __repr__(self) -> str:
        return f"WithPseudoLabels({self._source!r}, {self._labels_dir})"


def segments_dirs(labels_dir: str, segments_dir: str = "") -> list[str]:
    """Where per-segment records are looked for: ``segments_dir`` if given, else
    ``<labels_dir>/segments`` and ``<parent of labels_dir>/segments``."""
    if segments_dir:
        return [os.path.abspath(os.path.expanduser(segments_dir))]
    root = os.path.abspath(os.path.expanduser(labels_dir))
    return [os.path.join(root, SEGMENTS_DIRNAME), os.path.join(os.path.dirname(root), SEGMENTS_DIRNAME)]


def find_segments_dir(labels_dir: str, segments_dir: str = "") -> str:
    """The first existing folder of ``segments_dirs``; ``FileNotFoundError`` naming the config fields."""
    candidates = segments_dirs(labels_dir, segments_dir)
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise FileNotFoundError(
        f"no per-segment records found (looked in {', '.join(candidates)}): enhanced-label option C "
        f"(config.train.zsp.enhanced='relabel') relabels inside the labeller's SAM segments, written to "
        f"<labels root>/segments/<image>.json; run the labeller with segment records, or set "
        f"config.data.pseudo_label_segments to their folder")


def read_segments(segments_dir: str, name: str) -> dict[str, Any]:
    """The labeller's per-segment record of image ``name``, checked.

    Returns ``{"image", "height", "width", "segments": [{"segmentation": COCO RLE, "area", "bbox",
    "class", "similarity", "predicted_iou", "stability_score"}, ...]}``. Raises ``FileNotFoundError``
    or ``ValueError`` naming the file.
    """
    import json

    path = find_label(segments_dir, name, ".json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: per-segment record of {name} missing (needed by enhanced-label option C)")
    try:
        with open(path) as f:
            rec = json.load(f)
        h, w = int(rec["height"]), int(rec["width"])
        for s in rec["segments"]:
            if list(s["segmentation"]["size"]) != [h, w] or "class" not in s:
                raise ValueError(f"a segment of size {s['segmentation']['size']} or without a class")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a per-segment record ({type(e).__name__}: {e})") from e
    return rec


def segment_masks(record: dict[str, Any]) -> np.ndarray:
    """bool (K, H, W) masks of a ``read_segments`` record (COCO RLE decoded with pycocotools)."""
    from pycocotools import mask as mask_utils

    h, w = int(record["height"]), int(record["width"])
    if not record["segments"]:
        return np.zeros((0, h, w), bool)
    rles = [{"size": [h, w], "counts": s["segmentation"]["counts"]} for s in record["segments"]]
    for r in rles:
        if isinstance(r["counts"], str):
            r["counts"] = r["counts"].encode()
    return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)

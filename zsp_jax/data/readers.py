"""Readers for the standard on-disk layouts: each turns a directory into a list of ``Example``.

* VOC 2012 (``VOCdevkit/VOC2012``): ``JPEGImages/``, ``SegmentationClass/`` (the 2,913 fine masks)
  and ``SegmentationClassAug/`` (the SBD-augmented masks that make the 10,582-image
  ``train_aug`` set). A mask is taken from ``SegmentationClass`` when it exists there, else from
  ``SegmentationClassAug``; UniMatch's own preprocessed ``SegmentationClass`` folder (all masks
  in one place) works the same way.
* COCO 2017 semantic (UniMatch's layout): ``train2017/``, ``val2017/`` and ``masks/<stem>.png``
  (81 classes, written by ``tools/prepare_coco.py``).
* ADE20K (``ADEChallengeData2016``, UniMatch V2's layout): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/<stem>.png``; 150 classes (``classes.ADE20K_CLASSES``), no background.
  The masks are read as stored, as UniMatch V2's ``dataset/semi.py`` reads them (no label mapping in
  its code): V2 trains on its own pre-processed annotations (linked from its README), whose values are
  the class indices 0..149 and 255 for ADE's unlabelled "other" pixels. The annotations of the
  original ADEChallengeData2016 zip hold 0 = other and 1..150 instead; ``reduce_zero_label`` maps
  them to V2's form (0 -> 255, k -> k - 1), and ``Ade20kLayout`` refuses such a folder (see
  ``check_ade20k_annotations``) rather than train with every class shifted by one.
* A plain folder of images (a user's own data), searched recursively, no labels.

An example's ``name`` is its image path relative to the dataset root, exactly as the first
column of a UniMatch split file (``JPEGImages/2007_000033.jpg``), so names are unique and a
split file maps onto examples without guessing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
DATASETS = ("voc", "coco", "ade20k")


@dataclasses.dataclass(frozen=True)
class Example:
    """One image and (for labelled data) its mask.

    name: image path relative to the dataset root (split-file form); image: absolute path;
    mask: absolute path of the class-index PNG, or None for unlabelled data.
    """

    name: str
    image: str
    mask: str | None = None

    def read_bytes(self) -> tuple[bytes, bytes]:
        """(encoded image bytes, encoded mask bytes or b"" when unlabelled), read as stored."""
        with open(self.image, "rb") as f:
            image = f.read()
        mask = b""
        if self.mask is not None:
            with open(self.mask, "rb") as f:
                mask = f.read()
        return image, mask


class Layout:
    """A dataset root plus the rule that finds an image's mask. Subclasses define ``subsets``."""

    dataset = ""
    exif = False  # annotated layouts keep stored pixel orientation (masks are aligned to it)

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def mask_candidates(self, image_rel: str) -> list[str]:
        raise NotImplementedError

    def resolve(self, image_rel: str, mask_rel: str | None = None, labeled: bool = True) -> Example:
        """Example for a split-file line. ``mask_rel`` (relative to root) is tried first, then the
        layout's own rule; a labelled example whose mask is found nowhere keeps the first
        candidate path, so that the scan reports it as missing."""
        image = os.path.join(self.root, image_rel)
        if not labeled:
            return Example(image_rel, image, None)
        candidates = ([os.path.join(self.root, mask_rel)] if mask_rel else []) + self.mask_candidates(image_rel)
        mask = next((c for c in candidates if os.path.isfile(c)), candidates[0] if candidates else None)
        return Example(image_rel, image, mask)

    def subset(self, name: str) -> list[Example]:
        raise NotImplementedError

    subsets: Sequence[str] = ()


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _read_ids(path: str) -> list[str]:
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


class VocLayout(Layout):
    """PASCAL VOC 2012 with SBD augmentation. ``root`` may be ``VOC2012``, ``VOCdevkit`` or its parent."""

    dataset = "voc"
    subsets = ("train_aug", "train", "val", "trainval")

    def __init__(self, root: str):
        super().__init__(find_voc_root(root))

    def mask_candidates(self, image_rel: str) -> list[str]:
        stem = _stem(image_rel)
        return [os.path.join(self.root, d, stem + ".png") for d in ("SegmentationClass", "SegmentationClassAug")]

    def _image_rel(self, stem: str) -> str:
        return f"JPEGImages/{stem}.jpg"

    def subset(self, name: str) -> list[Example]:
        """``train``/``val``/``trainval`` from ``ImageSets/Segmentation``; ``train_aug`` = every image
        with a mask in ``SegmentationClassAug`` or in the train list, minus val (10,582 for VOC+SBD),
        or ``ImageSets/Segmentation/train_aug.txt`` if present."""
        sets = os.path.join(self.root, "ImageSets", "Segmentation")
        if name in ("train", "val", "trainval"):
            path = os.path.join(sets, name + ".txt")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"VOC list {path} not found (is {self.root} a VOC2012 directory?)")
            stems = _read_ids(path)
        elif name == "train_aug":
            listed = os.path.join(sets, "train_aug.txt")
            if os.path.isfile(listed):
                stems = [_stem(s) for s in _read_ids(listed)]
            else:
                aug = os.path.join(self.root, "SegmentationClassAug")
                if not os.path.isdir(aug):
                    raise FileNotFoundError(
                        f"{aug} not found: train_aug needs the SBD-augmented masks (SegmentationClassAug, "
                        f"10,582 + 1,449 PNGs) next to JPEGImages, or a list ImageSets/Segmentation/train_aug.txt")
                stems = {_stem(f) for f in os.listdir(aug) if f.endswith(".png")}
                train = os.path.join(sets, "train.txt")
                if os.path.isfile(train):
                    stems |= set(_read_ids(train))
                val = os.path.join(sets, "val.txt")
                if os.path.isfile(val):
                    stems -= set(_read_ids(val))
                stems = sorted(stems)
        else:
            raise ValueError(f"unknown VOC subset {name!r}; expected one of {list(self.subsets)}")
        return [self.resolve(self._image_rel(s)) for s in stems]


class CocoLayout(Layout):
    """COCO 2017 in UniMatch's semantic layout: ``train2017/``, ``val2017/``, ``masks/<stem>.png``."""

    dataset = "coco"
    subsets = ("train", "val")

    def mask_candidates(self, image_rel: str) -> list[str]:
        return [os.path.join(self.root, "masks", _stem(image_rel) + ".png")]

    def subset(self, name: str) -> list[Example]:
        if name not in self.subsets:
            raise ValueError(f"unknown COCO subset {name!r}; expected one of {list(self.subsets)}")
        folder = os.path.join(self.root, f"{name}2017")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"COCO image folder {folder} not found")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        return [self.resolve(f"{name}2017/{f}") for f in files]


def find_ade20k_root(root: str) -> str:
    """The directory holding ``images/`` and ``annotations/``: ``root`` or ``root/ADEChallengeData2016``."""
    root = os.path.abspath(os.path.expanduser(root))
    for cand in (root, os.path.join(root, "ADEChallengeData2016")):
        if os.path.isdir(os.path.join(cand, "images")) and os.path.isdir(os.path.join(cand, "annotations")):
            return cand
    raise FileNotFoundError(f"no ADE20K directory (with images/ and annotations/) at {root} or "
                            f"{root}/ADEChallengeData2016")


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """An original ADEChallengeData2016 annotation (uint8 (H, W): 0 = other, 1..150 the classes) in UniMatch V2's
    form, uint8 (H, W): 0 -> 255 (ignore), k -> k - 1 (classes 0..149). Values already 255 stay 255."""
    mask = np.asarray(mask, np.uint8)
    return np.where((mask == 0) | (mask == 255), np.uint8(255), mask - np.uint8(1)).astype(np.uint8)


def check_ade20k_annotations(root: str, subset: str = "validation", probe: int = 20) -> None:
    """Raises ``ValueError`` when the annotations under ``root`` are the original zip's (0 = other, 1..150),
    not UniMatch V2's pre-processed ones (0..149, 255 = other).

    Read from up to ``probe`` masks: the original annotations mark "other" with 0 and never use 255; V2's
    mark it with 255 (every ADE image has some), so masks that hold 0 or 150 and never 255 are the
    original form. (With too few masks to tell, nothing is raised: the class-range check of every mask
    still stops a value of 150.)
    """
    from PIL import Image

    folder = os.path.join(root, "annotations", subset)
    if not os.path.isdir(folder):
        return
    names = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:probe]
    has_ignore, has_zero_or_150 = False, False
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as img:
                counts = np.bincount(np.asarray(img).reshape(-1).astype(np.int64), minlength=256)
        except (OSError, ValueError):
            continue  # a bad file is reported by the input scan, naming it
        has_ignore |= bool(counts[255])
        has_zero_or_150 |= bool(counts[0] or counts[150])
    if names and has_zero_or_150 and not has_ignore:
        raise ValueError(f"the ADE20K annotations in {os.path.join(root, 'annotations')} are the original "
                         f"ADEChallengeData2016 ones (0 = other, classes 1..150); UniMatch V2 trains on its "
                         f"pre-processed annotations (classes 0..149, 255 = other), linked from its README. Use "
                         f"those, or write them with zsp_jax.data.readers.reduce_zero_label (0 -> 255, k -> k - 1)")


class Ade20kLayout(Layout):
    """ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/``, ``annotations/{...}/<stem>.png``
    (UniMatch V2's annotations: classes 0..149, 255 = other). ``root`` may be the folder itself or its parent."""

    dataset = "ade20k"
    subsets = ("training", "validation")

    def __init__(self, root: str, *, check_annotations: bool = True):
        super().__init__(find_ade20k_root(root))
        if check_annotations:
            check_ade20k_annotations(self.root)

    def mask_candidates(self, image_rel: str) -> list[str]:
        parts = image_rel.replace(os.sep, "/").split("/")
        subset = parts[1] if len(parts) >= 3 and parts[0] == "images" else "training"
        return [os.path.join(self.root, "annotations", subset, _stem(image_rel) + ".png")]

    def subset(self, name: str) -> list[Example]:
        if name not in self.subsets:
            raise ValueError(f"unknown ADE20K subset {name!r}; expected one of {list(self.subsets)}")
        folder = os.path.join(self.root, "images", name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ADE20K image folder {folder} not found")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        return [self.resolve(f"images/{name}/{f}") for f in files]


def make_layout(dataset: str, root: str) -> Layout:
    """The layout reader for ``dataset`` ("voc", "coco" or "ade20k") rooted at ``root``."""
    if dataset == "voc":
        return VocLayout(root)
    if dataset == "coco":
        return CocoLayout(root)
    if dataset == "ade20k":
        return Ade20kLayout(root)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")


def find_voc_root(root: str) -> str:
    """The directory holding ``JPEGImages``: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = os.path.abspath(os.path.expanduser(root))
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(f"no VOC2012 directory (with JPEGImages/) at {root}, {root}/VOC2012 or "
                            f"{root}/VOCdevkit/VOC2012")


def folder_examples(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Example]:
    """Every image under ``root`` (recursive, sorted, hidden entries skipped), unlabelled.

    Names are paths relative to ``root`` with their extension (``a/b.jpg``), so ``x.jpg`` and
    ``x.png`` in one folder stay distinct. EXIF orientation is applied when these are decoded.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found")
    exts = tuple(e.lower() for e in extensions)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(exts):
                full = os.path.join(dirpath, f)
                out.append(Example(os.path.relpath(full, root).replace(os.sep, "/"), full, None))
    return out

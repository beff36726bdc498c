"""Readers for the standard on-disk layouts: each turns a directory into a list of ``Example``.

* VOC 2012 (``VOCdevkit/VOC2012``): ``JPEGImages/``, ``SegmentationClass/`` (the 2,913 fine masks)
  and ``SegmentationClassAug/`` (the SBD-augmented masks that make the 10,582-image
  ``train_aug`` set). A mask is taken from ``SegmentationClass`` when it exists there, else from
  ``SegmentationClassAug``; UniMatch's own preprocessed ``SegmentationClass`` folder (all masks
  in one place) works the same way.
* COCO 2017 semantic (UniMatch's layout): ``train2017/``, ``val2017/`` and ``masks/<stem>.png``
  (81 classes, written by ``tools/prepare_coco.py``).
* A plain folder of images (a user's own data), searched recursively, no labels.

An example's ``name`` is its image path relative to the dataset root, exactly as the first
column of a UniMatch split file (``JPEGImages/2007_000033.jpg``), so names are unique and a
split file maps onto examples without guessing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
DATASETS = ("voc", "coco")


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


def make_layout(dataset: str, root: str) -> Layout:
    """The layout reader for ``dataset`` ("voc" or "coco") rooted at ``root``."""
    if dataset == "voc":
        return VocLayout(root)
    if dataset == "coco":
        return CocoLayout(root)
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

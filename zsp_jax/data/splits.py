"""UniMatch-format split files: read, write, and make seeded splits of any size.

A split is a directory ``<splits_dir>/<split>/`` with ``labeled.txt`` and ``unlabeled.txt``;
each line is ``<image path> <mask path>`` relative to the dataset root
(``JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png``), so the splits published
with UniMatch can be used as they are. ``val.txt`` next to the split directories lists the
evaluation images in the same format.

Split names: a count (``92``, ``1464``: labelled images drawn from the VOC ``train`` list, the
rest of ``train_aug`` unlabelled) or a fraction ``1_N`` (``ceil(len(pool) / N)`` labelled images
drawn from the whole pool: VOC ``train_aug``, COCO ``train`` or ADE20K ``training``). The sizes match
UniMatch's lists (1_16 of VOC: 662; 1_512 of COCO: 232) and UniMatch V2's ADE20K lists (1_64 of 20,210: 316).

UniMatch V2's published lists (``splits/pascal``, ``splits/coco``, ``splits/ade20k`` of its repository) are
in the same format (image path and mask path with extensions, relative to the dataset root, a ``val.txt``
beside the split folders) and are read as they are: point ``data.splits_dir`` at one of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from zsp_jax.data.readers import Example, Layout
from zsp_jax.utils import io

VOC_SPLITS = ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2")
COCO_SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
ADE20K_SPLITS = ("1_64", "1_32", "1_16", "1_8", "1_4", "1_2")  # UniMatch V2's splits/ade20k
SPLITS = {"voc": VOC_SPLITS, "coco": COCO_SPLITS, "ade20k": ADE20K_SPLITS}
# The pool split files draw from, and (for count splits) where the labelled images come from.
POOL = {"voc": "train_aug", "coco": "train", "ade20k": "training"}
COUNT_SOURCE = {"voc": "train"}
VAL = {"voc": "val", "coco": "val", "ade20k": "validation"}


def read_split_file(path: str) -> list[tuple[str, str | None]]:
    """Lines ``image [mask]`` -> ``[(image_rel, mask_rel or None)]``, in file order.

    Raises ``FileNotFoundError`` naming the file, ``ValueError`` naming file and line for a line
    with more than two fields or an absolute path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} not found (write splits with tools/make_splits.py, or "
                                f"point config.data.splits_dir at UniMatch's splits/<dataset> directory)")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or any(os.path.isabs(p) for p in parts):
                raise ValueError(f"{path}:{i}: expected 'image_path [mask_path]' relative to the dataset root, "
                                 f"got {line.strip()!r}")
            out.append((parts[0], parts[1] if len(parts) == 2 else None))
    return out


def write_split_file(path: str, pairs: Sequence[tuple[str, str | None]]) -> None:
    """Writes ``image [mask]`` lines atomically (the inverse of ``read_split_file``)."""
    lines = [img if mask is None else f"{img} {mask}" for img, mask in pairs]
    io.write_text_atomic(path, "".join(line + "\n" for line in lines))


def example_pairs(layout: Layout, examples: Sequence[Example]) -> list[tuple[str, str | None]]:
    """Examples -> split-file pairs with paths relative to the layout's root."""
    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(p, layout.root).replace(os.sep, "/")
    return [(e.name, rel(e.mask)) for e in examples]


def split_paths(splits_dir: str, split: str) -> tuple[str, str]:
    d = os.path.join(splits_dir, split)
    return os.path.join(d, "labeled.txt"), os.path.join(d, "unlabeled.txt")


def load_split(layout: Layout, splits_dir: str, split: str) -> tuple[list[Example], list[Example]]:
    """(labelled, unlabelled) examples of ``<splits_dir>/<split>``, resolved against ``layout``.

    The two lists must not share an image (``ValueError`` names one that is in both).
    """
    lab_path, unl_path = split_paths(splits_dir, split)
    labeled = [layout.resolve(img, mask, labeled=True) for img, mask in read_split_file(lab_path)]
    unlabeled = [layout.resolve(img, None, labeled=False) for img, _ in read_split_file(unl_path)]
    both = {e.name for e in labeled} & {e.name for e in unlabeled}
    if both:
        raise ValueError(f"{len(both)} image(s) listed both in {lab_path} and {unl_path}, e.g. {sorted(both)[0]}")
    return labeled, unlabeled


def load_val(layout: Layout, splits_dir: str) -> list[Example]:
    """Evaluation examples from ``<splits_dir>/val.txt``."""
    return [layout.resolve(img, mask) for img, mask in read_split_file(os.path.join(splits_dir, "val.txt"))]


def labeled_count(split: str, pool_size: int) -> int:
    """Number of labelled images for a split name: ``"92"`` -> 92, ``"1_16"`` -> ceil(pool / 16)."""
    if split.startswith("1_"):
        denom = int(split[2:])
        if denom <= 0:
            raise ValueError(f"bad split fraction {split!r}")
        return math.ceil(pool_size / denom)
    if split.isdigit():
        return int(split)
    raise ValueError(f"split {split!r} is neither a count ('92') nor a fraction ('1_16')")


def make_split(pool: Sequence[Example], split: str, seed: int,
               candidates: Sequence[Example] | None = None) -> tuple[list[Example], list[Example]]:
    """Draws a seeded split: ``(labelled, unlabelled)``, both sorted by name.

    Args:
      pool: every training image (VOC ``train_aug``, COCO ``train``).
      split: a count or a ``1_N`` fraction (see ``labeled_count``).
      seed: the same seed and pool give the same split.
      candidates: where count splits draw labelled images from (VOC ``train``); fractions and a
        missing ``candidates`` draw from ``pool``.

    The unlabelled list is the pool minus the labelled images.
    """
    from_pool = split.startswith("1_") or candidates is None
    source = list(pool if from_pool else candidates)
    n = labeled_count(split, len(pool))
    if n > len(source):
        raise ValueError(f"split {split}: {n} labelled images requested but only {len(source)} available")
    rng = np.random.default_rng(seed)
    names = sorted(e.name for e in source)
    chosen = set(rng.choice(len(names), size=n, replace=False).tolist())
    chosen_names = {names[i] for i in chosen}
    by_name = {e.name: e for e in list(pool) + source}
    labeled = sorted((by_name[n_] for n_ in chosen_names), key=lambda e: e.name)
    unlabeled = sorted((e for e in pool if e.name not in chosen_names), key=lambda e: e.name)
    return labeled, unlabeled


def write_split(layout: Layout, splits_dir: str, split: str, labeled: Sequence[Example],
                unlabeled: Sequence[Example]) -> tuple[str, str]:
    """Writes ``<splits_dir>/<split>/{labeled,unlabeled}.txt``; returns their paths."""
    lab_path, unl_path = split_paths(splits_dir, split)
    write_split_file(lab_path, example_pairs(layout, labeled))
    write_split_file(unl_path, example_pairs(layout, unlabeled))
    return lab_path, unl_path


def make_splits(layout: Layout, splits_dir: str, splits: Sequence[str], seed: int) -> dict[str, tuple[int, int]]:
    """Writes each split (and ``val.txt``) for ``layout``; returns ``{split: (n_labelled, n_unlabelled)}``."""
    pool = layout.subset(POOL[layout.dataset])
    count_source = COUNT_SOURCE.get(layout.dataset)
    candidates = layout.subset(count_source) if count_source else None
    val = layout.subset(VAL[layout.dataset])
    write_split_file(os.path.join(splits_dir, "val.txt"), example_pairs(layout, val))
    out = {}
    for split in splits:
        labeled, unlabeled = make_split(pool, split, seed, candidates)
        write_split(layout, splits_dir, split, labeled, unlabeled)
        out[split] = (len(labeled), len(unlabeled))
    return out

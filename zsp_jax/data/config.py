"""The config fields the data layer reads (stated once: ``DATA``, ``DATA_STAGE``), and their start-up
checks; every error names its field.

Fields (see ``configs/voc.py`` for their meaning): ``seed``, ``workdir``, ``data.*``
(``data.pseudo_labels`` is checked by ``validate_pseudo_labels`` when a mode needs it),
``train.*`` (UniMatch's optimisation settings, checked here so that a bad value stops a run at
start-up), ``data_stage.*`` and, for generated data, ``synthetic.*``.
"""

from __future__ import annotations

import os
import re

import ml_collections

from zsp_jax.config_utils import Setting, check_choice, check_range
from zsp_jax.data import bad_input, readers, splits
from zsp_jax.data.classes import NUM_CLASSES

SOURCES = ("tfds", "folder")
UNIMATCH_SPLITS = {"voc": "pascal", "coco": "coco", "ade20k": "ade20k"}  # folder names under UniMatch's splits/
STRONG_AUG = ("device", "host")
# Any directory name under data.splits_dir: counts ("92"), fractions ("1_16") and UniMatch's
# published lists ("u2pl_1_16") alike.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# The defaults are PASCAL VOC's, as UniMatch trains it; configs/*.py override what their dataset needs.
DATA = (
    Setting("dataset", "voc", "layout and class list: voc (21 classes) | coco (81) | ade20k (150, no background)"),
    Setting("num_classes", 21, "classes including background (voc 21, coco 81; ade20k 150, which has none)"),
    Setting("root", "data/VOCdevkit/VOC2012", "the dataset root (VOC: the folder holding JPEGImages/, or VOCdevkit, "
                                              "or its parent; COCO: holding train2017/, val2017/, masks/; ADE20K: "
                                              "ADEChallengeData2016, holding images/ and annotations/)"),
    Setting("splits_dir", "data/splits/voc", "<splits_dir>/<split>/{labeled,unlabeled}.txt and val.txt (UniMatch's "
                                             "format; tools/make_splits.py writes them)"),
    Setting("split", "1464", "the labelled split: a folder name under splits_dir (92, 1_16, u2pl_1_16, ...)"),
    Setting("source", "tfds", "tfds: build an ArrayRecord dataset once and read it | folder: read the files"),
    Setting("tfds_dir", "data/tfds", "where the TFDS build goes"),
    Setting("unlabeled_dir", "", "a folder of your own images to use as the unlabelled set (\"\": the split's)"),
    Setting("on_bad_input", "skip", "skip: leave bad files out and list them in bad_input.json | error: stop and "
                                    "list them"),
    Setting("strong_aug", "device", "device: strong views in JAX (the train step) | host: PIL in the workers"),
    Setting("mix_same_images", True, "CutMix partners are the same images re-augmented, as UniMatch's loaders "
                                     "(deeplab; UniMatch V2's partner is the flipped batch: no mix stream)"),
    Setting("workers", 8, "Grain worker processes (0: in the main process)"),
    Setting("read_threads", 2, "threads per process decoding and augmenting"),
    Setting("pseudo_labels", "", "zsp: the labeller's folder of pseudo-label maps (\"\": the label stage's output)"),
    Setting("pseudo_label_segments", "", "zsp relabel: per-segment records (\"\": <pseudo_labels>/../segments)"),
)
DATA_STAGE = (
    Setting("num_batches", 20, "batches the data stage runs through the input pipeline"),
    Setting("preview_images", 4, "rows in <workdir>/preview.png (0: no preview)"),
)


def _fail(name: str, value: object, why: str) -> None:
    raise ValueError(f"config field {name}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad field (paths are checked unless data is generated)."""
    d, t = config.data, config.train
    check_range("seed", config.seed, 0, 2**32 - 1)
    if not config.workdir:
        _fail("workdir", config.workdir, "must name a directory for the run's outputs")
    check_choice("data.dataset", d.dataset, readers.DATASETS)
    check_choice("data.source", d.source, SOURCES)
    check_choice("data.on_bad_input", d.on_bad_input, bad_input.POLICIES)
    check_choice("data.strong_aug", d.strong_aug, STRONG_AUG)
    if d.num_classes != NUM_CLASSES[d.dataset]:
        _fail("data.num_classes", d.num_classes, f"{d.dataset} has {NUM_CLASSES[d.dataset]} classes")
    if not _SPLIT_NAME.match(str(d.split)):
        _fail("data.split", d.split, f"expected the name of a split directory under data.splits_dir (a count "
                                     f"'92', a fraction '1_16', or UniMatch's 'u2pl_1_16'); standard {d.dataset} "
                                     f"splits: {list(splits.SPLITS[d.dataset])}")
    check_range("data.workers", d.workers, 0, 256)
    check_range("data.read_threads", d.read_threads, 1, 256)
    check_range("train.batch_size", t.batch_size, 1, None)
    if t.crop_size < 32:
        _fail("train.crop_size", t.crop_size, "must be at least 32")
    check_range("train.epochs", t.epochs, 1, None)
    for name in ("lr", "head_lr_multiplier", "weight_decay"):
        check_range(f"train.{name}", t[name], 0.0, None)
    check_range("train.momentum", t.momentum, 0.0, 1.0)
    check_range("train.conf_thresh", t.conf_thresh, 0.0, 1.0)
    check_range("data_stage.num_batches", config.data_stage.num_batches, 0, None)
    check_range("data_stage.preview_images", config.data_stage.preview_images, 0, 16)
    generated = bool(config.get("synthetic"))
    if generated:
        s = config.synthetic
        check_range("synthetic.num_train", s.num_train, 2, None)
        check_range("synthetic.num_val", s.num_val, 0, None)
        check_range("synthetic.min_size", s.min_size, 8, s.max_size)
        try:
            splits.labeled_count(str(d.split), s.num_train)
        except ValueError as e:
            _fail("data.split", d.split, f"generated data makes its own split: {e}")
        return
    if not os.path.isdir(os.path.expanduser(d.root)):
        _fail("data.root", d.root, "no such directory (the dataset root: VOCdevkit/VOC2012 for voc, the folder "
                                   "holding train2017/, val2017/ and masks/ for coco, ADEChallengeData2016 for ade20k)")
    lab, unl = splits.split_paths(os.path.expanduser(d.splits_dir), d.split)
    for path in (lab, unl):
        if not os.path.isfile(path):
            _fail("data.split", d.split, f"split file {path} not found; write it with "
                                         f"'python tools/make_splits.py --dataset {d.dataset} --root {d.root} "
                                         f"--out {d.splits_dir} --splits {d.split}' or set data.splits_dir to "
                                         f"UniMatch's splits/{UNIMATCH_SPLITS[d.dataset]} directory")
    if d.unlabeled_dir and not os.path.isdir(os.path.expanduser(d.unlabeled_dir)):
        _fail("data.unlabeled_dir", d.unlabeled_dir, "no such directory")


def validate_pseudo_labels(config: ml_collections.ConfigDict) -> None:
    """Checks ``data.pseudo_labels`` names an existing folder (run after the labeller has written it)."""
    labels = config.data.get("pseudo_labels", "")
    if not labels:
        _fail("data.pseudo_labels", labels, "training mode 'zsp' needs the folder of the labeller's pseudo-label "
                                            "maps (<label out_dir>/labels/<image path>.png): run the label stage "
                                            "first (zsp_jax.main fills this field from its output) or set it")
    if not os.path.isdir(os.path.expanduser(labels)):
        _fail("data.pseudo_labels", labels, "no such directory (the labeller's folder of pseudo-label maps, "
                                            "<label out_dir>/labels; run the label stage first)")

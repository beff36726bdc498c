r"""COCO 2017 semantic segmentation (81 classes: background + 80 things, UniMatch's order).

Run (first make the masks from the instance annotations, then the splits):

    python tools/prepare_coco.py --root data/coco
    python tools/make_splits.py --dataset coco --root data/coco --out data/splits/coco
    python -m zsp_jax.main --config configs/coco.py:split=1_512 --config.data.root=data/coco

Variants (after the colon): split=1_512|1_256|1_128|1_64|1_32 (default 1_512),
backbone=xception65, crop=<int> (default 513).
Any field can be overridden: --config.train.batch_size=16 --config.data.workers=16.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
BACKBONES = ("xception65",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, split="1_512", backbone="xception65", crop=513)
    check_choice("split", a.split, SPLITS)
    check_choice("backbone", a.backbone, BACKBONES)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = f"runs/coco_{a.split}_{a.backbone}_{a.crop}"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "coco"
    c.data.num_classes = 81
    c.data.root = "data/coco"                    # holds train2017/, val2017/, masks/ (tools/prepare_coco.py)
    c.data.splits_dir = "data/splits/coco"
    c.data.split = a.split
    c.data.source = "tfds"
    c.data.tfds_dir = "data/tfds"
    c.data.unlabeled_dir = ""
    c.data.on_bad_input = "skip"
    c.data.strong_aug = "device"
    c.data.mix_same_images = True
    c.data.workers = 8
    c.data.read_threads = 2

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8
    c.train.crop_size = a.crop
    c.train.epochs = 30                          # passes over the unlabelled set (UniMatch's)
    c.train.lr = 0.004                           # SGD base lr of the backbone, poly schedule (power 0.9)
    c.train.head_lr_multiplier = 10.0            # lr of ASPP + decoder = lr x this
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.conf_thresh = 0.95                   # confidence that lets an unlabelled pixel into the loss

    c.model = ml_collections.ConfigDict()
    c.model.backbone = a.backbone

    c.data_stage = ml_collections.ConfigDict()
    c.data_stage.num_batches = 20
    c.data_stage.preview_images = 4
    return c

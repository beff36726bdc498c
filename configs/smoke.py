r"""Smoke run: a tiny generated VOC-layout dataset, minutes on 2 CPU cores (the default of `make run`).

Run:

    python -m zsp_jax.main --config configs/smoke.py

Variants (after the colon): workers=<int> (default 2), source=tfds|folder (default tfds),
strong=device|host (default device). Any field can be overridden, e.g.
--config.data_stage.num_batches=20.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, workers=2, source="tfds", strong="device")
    check_choice("source", a.source, ("tfds", "folder"))
    check_choice("strong", a.strong, ("device", "host"))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/smoke"

    c.synthetic = ml_collections.ConfigDict()    # generate the dataset at data.root if it is not there
    c.synthetic.num_train = 24
    c.synthetic.num_val = 8
    c.synthetic.min_size = 64
    c.synthetic.max_size = 160

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "voc"
    c.data.num_classes = 21
    c.data.root = "runs/smoke/data/VOC2012"
    c.data.splits_dir = "runs/smoke/data/splits"
    c.data.split = "1_4"                         # 6 labelled / 18 unlabelled
    c.data.source = a.source
    c.data.tfds_dir = "runs/smoke/data/tfds"
    c.data.unlabeled_dir = ""
    c.data.on_bad_input = "skip"
    c.data.strong_aug = a.strong
    c.data.mix_same_images = True
    c.data.workers = a.workers
    c.data.read_threads = 2

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 4
    c.train.crop_size = 96
    c.train.epochs = 2                           # passes over the unlabelled set
    c.train.lr = 0.001                           # SGD base lr of the backbone, poly schedule (power 0.9)
    c.train.head_lr_multiplier = 10.0            # lr of ASPP + decoder = lr x this
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.conf_thresh = 0.95                   # confidence that lets an unlabelled pixel into the loss

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "r50"

    c.data_stage = ml_collections.ConfigDict()
    c.data_stage.num_batches = 8
    c.data_stage.preview_images = 4
    return c

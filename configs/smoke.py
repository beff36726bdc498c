r"""Smoke run: a tiny generated VOC-layout dataset, minutes on 2 CPU cores (the default of `make run`).

Run:

    python -m zsp_jax.main --config configs/smoke.py

Variants (after the colon): workers=<int> (default 2), source=tfds|folder (default tfds),
strong=device|host (default device), mode=zsp|unimatch|supervised (default zsp; unimatch_v2 with family=v2),
family=deeplab|v2 (default deeplab; v2: the UniMatch V2 trainer on a tiny random DINOv2 + DPT head, crop 56,
generated images of 64 to 76 px, which V2's evaluation resizes to one size, 70 x 70). Any field can be
overridden, e.g. --config.data_stage.num_batches=20.

    python -m zsp_jax.main --config configs/smoke.py:family=v2
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import AMG, LABEL
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what the smoke run changes is here."""
    a = parse_arg(arg, workers=2, source="tfds", strong="device", mode="zsp", family="deeplab")
    check_choice("source", a.source, ("tfds", "folder"))
    check_choice("strong", a.strong, ("device", "host"))
    check_choice("family", a.family, ("deeplab", "v2"))
    v2 = a.family == "v2"
    check_choice("mode", a.mode, ("zsp", "unimatch_v2", "supervised") if v2 else ("zsp", "unimatch", "supervised"))
    c = section(RUN, workdir="runs/smoke_v2" if v2 else "runs/smoke")

    c.synthetic = ml_collections.ConfigDict()    # generate the dataset at data.root if it is not there
    c.synthetic.num_train = 24
    c.synthetic.num_val = 8
    c.synthetic.min_size = 64
    c.synthetic.max_size = 160
    c.synthetic.checkpoints = "runs/smoke/weights"  # random tiny SAM and CLIP checkpoints written here

    c.data = section(DATA, root="runs/smoke/data/VOC2012", splits_dir="runs/smoke/data/splits",
                     split="1_4",                # 6 labelled / 18 unlabelled
                     source=a.source, tfds_dir="runs/smoke/data/tfds", strong_aug=a.strong, workers=a.workers,
                     pseudo_labels="runs/smoke/pseudo_labels/labels")  # the label stage's maps (zsp)
    c.train = section(TRAIN, mode=a.mode, batch_size=4, loss_groups=1, crop_size=96,
                      epochs=4,                  # passes over the unlabelled set: 4 x 4 steps
                      lr=0.01,                   # a tiny random-initialised model learns faster than UniMatch's 1e-3
                      log_every=4)
    c.model = section(MODEL, backbone="tiny_resnet")  # a few thousand parameters, random initialisation
    c.eval = section(EVAL, bucket=160,           # one canvas: the generated images are at most 160 px
                     every_epochs=2, threads=2)
    c.checkpoint = section(CHECKPOINT, every_steps=4)

    # zero-shot pseudo labels (docs/settings.md, label)
    c.label = section(LABEL, classes="voc",
                      sam_checkpoint="runs/smoke/weights/sam_tiny.safetensors",  # random tiny models
                      clip_checkpoint="runs/smoke/weights/clip_tiny.safetensors",  # (synthetic.checkpoints)
                      clip_size=64,              # the tiny CLIP has 8x8 patches: an 8x8 feature grid
                      gem_depth=3,               # it has 3 vision blocks: GEM on the last 2
                      threshold=0.0,
                      amg=section(AMG, points_per_side=8,  # random weights: keep candidates (no filters, no NMS)
                                  pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
                                  box_nms_thresh=1.0, max_masks=64),
                      bucket=160,                # every generated image (<= 160 px) in one compiled program
                      report_images=8)

    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE, num_batches=8)
    if v2:
        _v2_variant(c)
    return c


def _v2_variant(c: ml_collections.ConfigDict) -> None:
    """The UniMatch V2 trainer on a tiny random DINOv2 + DPT head (its own work directory and data)."""
    c.synthetic.checkpoints = "runs/smoke_v2/weights"
    c.synthetic.min_size = 64                    # V2's evaluation resizes 63..76 px to 70 (5 patches): one program
    c.synthetic.max_size = 76
    c.data.root = "runs/smoke_v2/data/VOC2012"
    c.data.splits_dir = "runs/smoke_v2/data/splits"
    c.data.tfds_dir = "runs/smoke_v2/data/tfds"
    c.data.pseudo_labels = "runs/smoke_v2/pseudo_labels/labels"
    c.label.sam_checkpoint = "runs/smoke_v2/weights/sam_tiny.safetensors"
    c.label.clip_checkpoint = "runs/smoke_v2/weights/clip_tiny.safetensors"
    c.train.crop_size = 56                       # a multiple of DINOv2's patch 14 (4 x 4 patches)
    c.train.lr = 2e-4                            # AdamW; V2's 5e-6 is for a pretrained encoder, these are random
    c.train.head_lr_multiplier = 10.0
    c.train.weight_decay = 0.01                  # V2's
    c.model = section(MODEL, family="unimatch_v2", encoder="tiny")  # 4 blocks, 32 wide, random initialisation
    c.eval.bucket = 80                           # one canvas: the generated images are at most 76 px
    c.label.bucket = 80

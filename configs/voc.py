r"""PASCAL VOC 2012 + SBD (train_aug 10,582 images, val 1,449), the UniMatch setting.

Run (the dataset root holds JPEGImages/, SegmentationClass/, SegmentationClassAug/):

    python tools/make_splits.py --dataset voc --root data/VOCdevkit/VOC2012 --out data/splits/voc
    python -m zsp_jax.main --config configs/voc.py:split=1464,backbone=r101 \
        --config.data.root=data/VOCdevkit/VOC2012

Variants (after the colon): split=92|183|366|732|1464|1_16|1_8|1_4|1_2|u2pl_1_16|u2pl_1_8|u2pl_1_4
(default 1464; the u2pl lists come with UniMatch: point data.splits_dir at its splits/pascal),
backbone=r50|r101 (default r101), crop=<int> (default 321; UniMatch also uses 513),
mode=zsp|unimatch|supervised (default zsp, the paper).
Any field can be overridden: --config.train.batch_size=16 --config.data.workers=16.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import LABEL, PAPER_MODELS
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN

SPLITS = ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4")
MODES = ("zsp", "unimatch", "supervised")
BACKBONES = ("r50", "r101")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what VOC and the variant set is here."""
    a = parse_arg(arg, split="1464", backbone="r101", crop=321, mode="zsp")
    check_choice("split", a.split, SPLITS)
    check_choice("backbone", a.backbone, BACKBONES)
    check_choice("mode", a.mode, MODES)
    c = section(RUN, workdir=f"runs/voc_{a.split}_{a.backbone}_{a.crop}_{a.mode}")
    c.data = section(DATA, dataset="voc", num_classes=21, root="data/VOCdevkit/VOC2012", splits_dir="data/splits/voc",
                     split=a.split)
    c.train = section(TRAIN, mode=a.mode, crop_size=a.crop)  # UniMatch's VOC schedule: the defaults
    # SET: UniMatch's ImageNet backbone (.pth from its README, converted once into <workdir>/converted)
    c.model = section(MODEL, backbone=a.backbone,
                      pretrained=f"weights/{'resnet101' if a.backbone == 'r101' else 'resnet50'}.pth")
    c.eval = section(EVAL)
    c.checkpoint = section(CHECKPOINT)
    # zero-shot pseudo labels (docs/settings.md, label)
    c.label = section(LABEL, classes="voc",     # 20 VOC classes (label values as the dataset's)
                      **PAPER_MODELS)            # SET: weights/sam_vit_h_4b8939.pth, weights/ViT-B-16.pt
    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE)
    return c

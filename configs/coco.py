r"""COCO 2017 semantic segmentation (81 classes: background + 80 things, UniMatch's order).

Run (first make the masks from the instance annotations, then the splits):

    python tools/prepare_coco.py --root data/coco
    python tools/make_splits.py --dataset coco --root data/coco --out data/splits/coco
    python -m zsp_jax.main --config configs/coco.py:split=1_512 --config.data.root=data/coco

Variants (after the colon): split=1_512|1_256|1_128|1_64|1_32 (default 1_512),
backbone=xception65, crop=<int> (default 513), mode=zsp|unimatch|supervised (default zsp).
Any field can be overridden: --config.train.batch_size=16 --config.data.workers=16.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import LABEL, PAPER_MODELS
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
BACKBONES = ("xception65",)
MODES = ("zsp", "unimatch", "supervised")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what COCO and the variant set is here."""
    a = parse_arg(arg, split="1_512", backbone="xception65", crop=513, mode="zsp")
    check_choice("split", a.split, SPLITS)
    check_choice("backbone", a.backbone, BACKBONES)
    check_choice("mode", a.mode, MODES)
    c = section(RUN, workdir=f"runs/coco_{a.split}_{a.backbone}_{a.crop}_{a.mode}")
    c.data = section(DATA, dataset="coco", num_classes=81, root="data/coco", splits_dir="data/splits/coco",
                     split=a.split)
    c.train = section(TRAIN, mode=a.mode, crop_size=a.crop, epochs=30, lr=0.004)  # UniMatch's COCO schedule
    # SET: UniMatch's ImageNet Xception-65 (.pth, converted once into <workdir>/converted)
    c.model = section(MODEL, backbone=a.backbone, pretrained="weights/xception.pth")
    c.eval = section(EVAL)
    c.checkpoint = section(CHECKPOINT)
    # zero-shot pseudo labels (docs/settings.md, label)
    c.label = section(LABEL, classes="coco",    # 80 COCO classes in UniMatch's order
                      **PAPER_MODELS)            # SET: weights/sam_vit_h_4b8939.pth, weights/ViT-B-16.pt
    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE)
    return c

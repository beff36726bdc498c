r"""COCO 2017 semantic segmentation (81 classes) with the UniMatch V2 trainer (DINOv2 + DPT head, AdamW, EMA teacher).

Run (first make the masks from the instance annotations, then the splits; DINOv2's dinov2_vits14_pretrain.pth
etc. from github.com/facebookresearch/dinov2):

    python tools/prepare_coco.py --root data/coco
    python tools/make_splits.py --dataset coco --root data/coco --out data/splits/coco
    python -m zsp_jax.main --config configs/coco_v2.py:encoder=s --config.data.root=data/coco

Variants (after the colon): encoder=s|b|l|g (default s), split=1_512|1_256|1_128|1_64|1_32 (default 1_512;
UniMatch V2's own lists: point data.splits_dir at its splits/coco), crop=<int> (a multiple of 14, default 518),
mode=zsp|unimatch_v2|supervised (default zsp). Any field can be overridden: --config.data.workers=16.
The eval stage evaluates the EMA teacher of the best-EMA checkpoint (--config.eval.weights=student: the student).
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import LABEL, PAPER_MODELS
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN, V2_OPTIMISER
from zsp_jax.train.v2_state import PRETRAINED_FILES

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
MODES = ("zsp", "unimatch_v2", "supervised")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what V2 on COCO and the variant set is here."""
    a = parse_arg(arg, encoder="s", split="1_512", crop=518, mode="zsp")
    check_choice("encoder", a.encoder, tuple(PRETRAINED_FILES))
    check_choice("split", a.split, SPLITS)
    check_choice("mode", a.mode, MODES)
    c = section(RUN, workdir=f"runs/coco_v2_{a.split}_{a.encoder}_{a.crop}_{a.mode}")
    c.data = section(DATA, dataset="coco", num_classes=81, root="data/coco", splits_dir="data/splits/coco",
                     split=a.split)
    # UniMatch V2's configs/coco.yaml: 4 images per GPU x 4 GPUs, crop 518, 20 epochs, its AdamW
    c.train = section(TRAIN, mode=a.mode, crop_size=a.crop, batch_size=16, loss_groups=4, epochs=20,
                      **V2_OPTIMISER)
    # SET: DINOv2's pretrained encoder (.pth, converted once into <workdir>/converted); the head starts random
    c.model = section(MODEL, family="unimatch_v2", encoder=a.encoder,
                      pretrained=f"weights/{PRETRAINED_FILES[a.encoder]}")
    c.eval = section(EVAL)
    c.checkpoint = section(CHECKPOINT)
    # zero-shot pseudo labels (docs/settings.md, label)
    c.label = section(LABEL, classes="coco",    # 80 COCO classes in UniMatch's order
                      **PAPER_MODELS)            # SET: weights/sam_vit_h_4b8939.pth, weights/ViT-B-16.pt
    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE)
    return c

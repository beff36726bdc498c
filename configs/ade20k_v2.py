r"""ADE20K (150 classes, no background) with the UniMatch V2 trainer (DINOv2 + DPT head, AdamW, EMA teacher).

Run (the dataset root is ADEChallengeData2016 with images/{training,validation}/ and UniMatch V2's pre-processed
annotations/{training,validation}/ (classes 0..149, 255 = other; linked from V2's README); its split lists as
data.splits_dir, or write them; DINOv2's dinov2_vits14_pretrain.pth etc. from github.com/facebookresearch/dinov2):

    python tools/make_splits.py --dataset ade20k --root data/ADEChallengeData2016 --out data/splits/ade20k
    python -m zsp_jax.main --config configs/ade20k_v2.py:encoder=s --config.data.root=data/ADEChallengeData2016

Variants (after the colon): encoder=s|b|l|g (default s), split=1_64|1_32|1_16|1_8|1_4|1_2 (default 1_64;
UniMatch V2's own lists: point data.splits_dir at its splits/ade20k), crop=<int> (a multiple of 14, default
518), mode=zsp|unimatch_v2|supervised (default zsp). Any field can be overridden: --config.data.workers=16.
The data are read through a TFDS ArrayRecord build made once (data.source=tfds; folder reads the files).
The eval stage evaluates the EMA teacher of the best-EMA checkpoint (--config.eval.weights=student: the student).
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.classes import ADE20K_CLASSES
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import LABEL, PAPER_MODELS
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN, V2_OPTIMISER
from zsp_jax.train.v2_state import PRETRAINED_FILES

SPLITS = ("1_64", "1_32", "1_16", "1_8", "1_4", "1_2")
MODES = ("zsp", "unimatch_v2", "supervised")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what V2 on ADE20K and the variant set is here."""
    a = parse_arg(arg, encoder="s", split="1_64", crop=518, mode="zsp")
    check_choice("encoder", a.encoder, tuple(PRETRAINED_FILES))
    check_choice("split", a.split, SPLITS)
    check_choice("mode", a.mode, MODES)
    c = section(RUN, workdir=f"runs/ade20k_v2_{a.split}_{a.encoder}_{a.crop}_{a.mode}")
    c.data = section(DATA, dataset="ade20k", num_classes=150, root="data/ADEChallengeData2016",
                     splits_dir="data/splits/ade20k", split=a.split)
    # UniMatch V2's configs/ade20k.yaml: 2 images per GPU x 4 GPUs, crop 518, 60 epochs, its AdamW, the encoder
    # locked
    c.train = section(TRAIN, mode=a.mode, crop_size=a.crop, batch_size=8, loss_groups=4, epochs=60,
                      **V2_OPTIMISER)
    # SET: DINOv2's pretrained encoder (.pth, converted once into <workdir>/converted); the head starts random
    c.model = section(MODEL, family="unimatch_v2", encoder=a.encoder, lock_backbone=True,
                      pretrained=f"weights/{PRETRAINED_FILES[a.encoder]}")
    c.eval = section(EVAL)
    c.checkpoint = section(CHECKPOINT)
    # zero-shot pseudo labels (docs/settings.md, label) of ADE20K's 150 classes. The labeller numbers them 1..150
    # (0 = background, which ADE20K does not have); the trainer moves its maps onto ADE20K's 0..149 (background ->
    # 255, ignored: zsp_jax.data.inputs).
    c.label = section(LABEL, classes=",".join(ADE20K_CLASSES),
                      evaluate=False,            # its comparison with the ground truth assumes the same numbering
                      **PAPER_MODELS)            # SET: weights/sam_vit_h_4b8939.pth, weights/ViT-B-16.pt
    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE)
    return c

r"""PASCAL VOC 2012 + SBD with the UniMatch V2 trainer (DINOv2 + DPT head, AdamW, EMA teacher): V2's VOC setting.

Run (the dataset root holds JPEGImages/, SegmentationClass/, SegmentationClassAug/; DINOv2's
dinov2_vits14_pretrain.pth etc. from github.com/facebookresearch/dinov2, as UniMatch V2's pretrained/):

    python tools/make_splits.py --dataset voc --root data/VOCdevkit/VOC2012 --out data/splits/voc
    python -m zsp_jax.main --config configs/voc_v2.py:encoder=s --config.data.root=data/VOCdevkit/VOC2012

Variants (after the colon): encoder=s|b|l|g (default s, every V2 config's; V2's README reports b),
split=92|183|366|732|1464|1_16|1_8|1_4|1_2 (default 1464; UniMatch V2's own lists: point data.splits_dir at
its splits/pascal), crop=<int> (a multiple of 14, default 518), mode=zsp|unimatch_v2|supervised (default
zsp, the paper's labels on V2's trainer). Any field can be overridden: --config.train.batch_size=8.
The eval stage evaluates the EMA teacher of the best-EMA checkpoint (V2's reported result;
--config.eval.weights=student for the student).
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg, section
from zsp_jax.data.config import DATA, DATA_STAGE
from zsp_jax.label.options import LABEL, PAPER_MODELS
from zsp_jax.runtime import DISTRIBUTED
from zsp_jax.workflow import RUN
from zsp_jax.train.config import CHECKPOINT, EVAL, MODEL, TRAIN, V2_OPTIMISER
from zsp_jax.train.v2_state import PRETRAINED_FILES

SPLITS = ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2")
MODES = ("zsp", "unimatch_v2", "supervised")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field's default and meaning is in docs/settings.md; only what V2 on VOC and the variant set is here."""
    a = parse_arg(arg, encoder="s", split="1464", crop=518, mode="zsp")
    check_choice("encoder", a.encoder, tuple(PRETRAINED_FILES))
    check_choice("split", a.split, SPLITS)
    check_choice("mode", a.mode, MODES)
    c = section(RUN, workdir=f"runs/voc_v2_{a.split}_{a.encoder}_{a.crop}_{a.mode}")
    c.data = section(DATA, dataset="voc", num_classes=21, root="data/VOCdevkit/VOC2012", splits_dir="data/splits/voc",
                     split=a.split)
    # UniMatch V2's configs/pascal.yaml: 4 images per GPU x 4 GPUs (each GPU's losses normalised apart), crop
    # 518, 60 epochs, its AdamW
    c.train = section(TRAIN, mode=a.mode, crop_size=a.crop, batch_size=16, loss_groups=4, epochs=60,
                      **V2_OPTIMISER)
    # SET: DINOv2's pretrained encoder (.pth, converted once into <workdir>/converted); the head starts random
    c.model = section(MODEL, family="unimatch_v2", encoder=a.encoder,
                      pretrained=f"weights/{PRETRAINED_FILES[a.encoder]}")
    c.eval = section(EVAL)
    c.checkpoint = section(CHECKPOINT)
    # zero-shot pseudo labels (docs/settings.md, label)
    c.label = section(LABEL, classes="voc",     # 20 VOC classes (label values as the dataset's)
                      **PAPER_MODELS)            # SET: weights/sam_vit_h_4b8939.pth, weights/ViT-B-16.pt
    c.distributed = section(DISTRIBUTED)         # several processes (jax.distributed): docs/multi_host.md
    c.data_stage = section(DATA_STAGE)
    return c

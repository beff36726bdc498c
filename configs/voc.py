r"""PASCAL VOC 2012 + SBD (train_aug 10,582 images, val 1,449), the UniMatch setting.

Run (the dataset root holds JPEGImages/, SegmentationClass/, SegmentationClassAug/):

    python tools/make_splits.py --dataset voc --root data/VOCdevkit/VOC2012 --out data/splits/voc
    python -m zsp_jax.main --config configs/voc.py:split=1464,backbone=r101 \
        --config.data.root=data/VOCdevkit/VOC2012

Variants (after the colon): split=92|183|366|732|1464|1_16|1_8|1_4|1_2 (default 1464),
backbone=r50|r101 (default r101), crop=<int> (default 321; UniMatch also uses 513).
Any field can be overridden: --config.train.batch_size=16 --config.data.workers=16.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg

SPLITS = ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2")
BACKBONES = ("r50", "r101")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, split="1464", backbone="r101", crop=321)
    check_choice("split", a.split, SPLITS)
    check_choice("backbone", a.backbone, BACKBONES)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = f"runs/voc_{a.split}_{a.backbone}_{a.crop}"  # reports, previews, iterator state

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "voc"                       # layout and class list: voc (21 classes) | coco (81)
    c.data.num_classes = 21
    c.data.root = "data/VOCdevkit/VOC2012"       # the dataset root (or VOCdevkit, or its parent)
    c.data.splits_dir = "data/splits/voc"        # <splits_dir>/<split>/{labeled,unlabeled}.txt (UniMatch format)
    c.data.split = a.split
    c.data.source = "tfds"                       # tfds: build an ArrayRecord dataset once | folder: read files
    c.data.tfds_dir = "data/tfds"                # where the TFDS build goes
    c.data.unlabeled_dir = ""                    # a folder of your own images to use as the unlabelled set
    c.data.on_bad_input = "skip"                 # skip: leave bad files out, list them | error: stop, list them
    c.data.strong_aug = "device"                 # device: strong views in JAX (finalize) | host: PIL in workers
    c.data.mix_same_images = True                # CutMix partners = same images re-augmented, as the reference
    c.data.workers = 8                           # Grain worker processes (0: in the main process)
    c.data.read_threads = 2                      # threads per process for decoding/augmenting

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8                       # labelled (= unlabelled) images per step, all devices: 2 x 4 GPUs
    c.train.crop_size = a.crop
    c.train.epochs = 80                          # passes over the unlabelled set (UniMatch's)
    c.train.lr = 0.001                           # SGD base lr of the backbone, poly schedule (power 0.9)
    c.train.head_lr_multiplier = 10.0            # lr of ASPP + decoder = lr x this
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.conf_thresh = 0.95                   # confidence that lets an unlabelled pixel into the loss

    c.model = ml_collections.ConfigDict()
    c.model.backbone = a.backbone                # read by the trainer (DeepLabV3+ backbone)

    c.data_stage = ml_collections.ConfigDict()
    c.data_stage.num_batches = 20                # batches the data stage runs through the input pipeline
    c.data_stage.preview_images = 4              # rows in <workdir>/preview.png (0: no preview)
    return c

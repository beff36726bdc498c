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

from zsp_jax.config_utils import check_choice, parse_arg
from zsp_jax.label.options import default_label_config
from zsp_jax.runtime import default_distributed_config

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
BACKBONES = ("xception65",)
MODES = ("zsp", "unimatch", "supervised")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, split="1_512", backbone="xception65", crop=513, mode="zsp")
    check_choice("split", a.split, SPLITS)
    check_choice("backbone", a.backbone, BACKBONES)
    check_choice("mode", a.mode, MODES)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = f"runs/coco_{a.split}_{a.backbone}_{a.crop}_{a.mode}"

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
    c.data.pseudo_labels = ""                    # zsp: the labeller's folder of pseudo-label maps (<image path>.png)
    c.data.pseudo_label_segments = ""            # zsp relabel: per-segment records ("": <pseudo_labels>/../segments)

    c.train = ml_collections.ConfigDict()
    c.train.mode = a.mode                        # zsp (the paper) | unimatch (UniMatch V1) | supervised (labelled only)
    c.train.batch_size = 8                       # labelled (= unlabelled) images per step, all devices: 2 x 4 GPUs
    c.train.loss_groups = 4                      # losses normalised per 2+2 images, as on UniMatch's 4 GPUs
    c.train.crop_size = a.crop
    c.train.epochs = 30                          # passes over the unlabelled set (UniMatch's)
    c.train.max_steps = 0                        # stop after this many steps (0: epochs x steps per epoch)
    c.train.lr = 0.004                           # SGD base lr of the backbone, poly schedule per iteration
    c.train.lr_power = 0.9                       # poly exponent: lr = base (1 - it / total) ** power
    c.train.head_lr_multiplier = 10.0            # lr of ASPP + decoder = lr x this
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4                  # added to the gradient before momentum (torch SGD)
    c.train.conf_thresh = 0.95                   # unimatch: confidence that lets an unlabelled pixel into the loss
    c.train.stream_weights = (0.25, 0.25, 0.5)   # unlabelled loss weights: strong 1, strong 2, feature-perturbed
    c.train.label_smoothing = 0.1                # zsp: eps of the label-smoothed CE on the perturbed streams
    c.train.enhanced = "fixed"                   # zsp enhanced labels: fixed (A) | fusion (B) | relabel (C), README
    c.train.fusion_thresh = 0.95                 # zsp fusion: confidence at which the model overrides / fills Y0
    c.train.relabel_first_mode = "unimatch"      # zsp relabel: the first run's mode (unimatch | zsp)
    c.train.relabel_vote = 0.5                   # zsp relabel: share of a SAM segment the model's class must hold
    c.train.fsdp = 1                             # devices per parameter shard (1: parameters replicated)
    c.train.num_devices = 0                      # devices to use, the first N of each process (0: all)
    c.train.matmul_precision = "default"         # default | high | highest (fp32 parity: highest)
    c.train.compilation_cache = True             # persistent XLA cache in <workdir>/jax_cache (fast resumes)
    c.train.log_every = 20                       # steps between metric fetches (progress bar, logs, NaN check)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = a.backbone                # xception65 (UniMatch's COCO model) | r50 | r101 | tiny_*
    c.model.stem = "deep"                        # ResNet stem: deep (UniMatch's 3x 3x3) | plain (torchvision's 7x7)
    c.model.output_stride = 16
    c.model.pretrained = "weights/xception.pth"  # SET: UniMatch's ImageNet Xception-65 (.pth, converted once into
    #   <workdir>/converted; or a .safetensors from tools/convert_backbone.py); "": random initialisation
    c.model.dtype = "float32"                    # compute dtype: float32 | bfloat16 (parameters stay fp32)

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "original"                     # original (whole image, UniMatch's) | center_crop | sliding_window
    c.eval.bucket = 64                           # pad images to multiples of this (static shapes); 0: exact sizes
    c.eval.batch_size = 0                        # images per evaluation batch over all devices (0: one per device)
    c.eval.every_epochs = 1                      # evaluate every N epochs (0: not at epoch ends)
    c.eval.every_steps = 0                       # and every N steps (0: no)
    c.eval.at_end = True                         # evaluate the final model
    c.eval.threads = 4                           # host threads decoding evaluation images

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500               # also at every epoch end and evaluation
    c.checkpoint.keep = 2                        # the last K checkpoints (and the best by mIoU) are kept
    c.checkpoint.keep_best = True
    c.checkpoint.async_save = True               # write in the background

    c.label = default_label_config()             # zero-shot pseudo labels; every field: zsp_jax/label/options.py
    c.label.classes = "coco"                     # 80 COCO classes in UniMatch's order
    c.label.sam_checkpoint = "weights/sam_vit_h_4b8939.pth"  # SET: SAM ViT-H (.pth, or converted .safetensors)
    c.label.sam_variant = "vit_h"                # the run checks the file holds this ("" accepts any)
    c.label.clip_checkpoint = "weights/ViT-B-16.pt"          # SET: OpenAI CLIP ViT-B/16 (GEM's default model)
    c.label.clip_variant = "vit_b16"             # checked likewise ("" accepts any)
    c.label.clip_size = 448                      # GEM's input size

    c.stages = "convert,label,train,eval"        # stages to run, in this order (each skips work already done)
    c.verbose = False                            # True: library logs on the console too (always in <workdir>/logs)
    c.distributed = default_distributed_config()  # several processes (jax.distributed): zsp_jax/runtime.py

    c.data_stage = ml_collections.ConfigDict()
    c.data_stage.num_batches = 20
    c.data_stage.preview_images = 4
    return c

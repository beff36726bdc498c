r"""Smoke run: a tiny generated VOC-layout dataset, minutes on 2 CPU cores (the default of `make run`).

Run:

    python -m zsp_jax.main --config configs/smoke.py

Variants (after the colon): workers=<int> (default 2), source=tfds|folder (default tfds),
strong=device|host (default device), mode=zsp|unimatch|supervised (default zsp). Any field can be overridden, e.g.
--config.data_stage.num_batches=20.
"""

import ml_collections

from zsp_jax.config_utils import check_choice, parse_arg
from zsp_jax.label.options import default_label_config
from zsp_jax.runtime import default_distributed_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, workers=2, source="tfds", strong="device", mode="zsp")
    check_choice("source", a.source, ("tfds", "folder"))
    check_choice("strong", a.strong, ("device", "host"))
    check_choice("mode", a.mode, ("zsp", "unimatch", "supervised"))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/smoke"

    c.synthetic = ml_collections.ConfigDict()    # generate the dataset at data.root if it is not there
    c.synthetic.num_train = 24
    c.synthetic.num_val = 8
    c.synthetic.min_size = 64
    c.synthetic.max_size = 160
    c.synthetic.checkpoints = "runs/smoke/weights"  # random tiny SAM and CLIP checkpoints written here

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
    c.data.pseudo_labels = "runs/smoke/pseudo_labels/labels"  # the label stage's maps (zsp; "": its output)
    c.data.pseudo_label_segments = ""

    c.train = ml_collections.ConfigDict()       # the fields are those of configs/voc.py (commented there)
    c.train.mode = a.mode                        # zsp: pseudo labels from data.pseudo_labels (the label stage)
    c.train.batch_size = 4
    c.train.crop_size = 96
    c.train.epochs = 4                           # passes over the unlabelled set: 4 x 4 steps
    c.train.max_steps = 0
    c.train.lr = 0.01                            # a tiny random-initialised model learns faster than UniMatch's 1e-3
    c.train.lr_power = 0.9
    c.train.head_lr_multiplier = 10.0
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.conf_thresh = 0.95
    c.train.stream_weights = (0.25, 0.25, 0.5)
    c.train.label_smoothing = 0.1
    c.train.enhanced = "fixed"
    c.train.fusion_thresh = 0.95
    c.train.relabel_first_mode = "unimatch"
    c.train.relabel_vote = 0.5
    c.train.loss_groups = 1                      # losses normalised over the whole batch (voc.py: per GPU of UniMatch)
    c.train.fsdp = 1
    c.train.num_devices = 0
    c.train.matmul_precision = "default"
    c.train.compilation_cache = True
    c.train.log_every = 4

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "tiny_resnet"             # a few thousand parameters, random initialisation
    c.model.stem = "deep"
    c.model.output_stride = 16
    c.model.pretrained = ""
    c.model.dtype = "float32"

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "original"
    c.eval.bucket = 160                         # one canvas: the generated images are at most 160 px
    c.eval.batch_size = 0
    c.eval.every_epochs = 2
    c.eval.every_steps = 0
    c.eval.at_end = True
    c.eval.threads = 2

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 4
    c.checkpoint.keep = 2
    c.checkpoint.keep_best = True
    c.checkpoint.async_save = True

    c.label = default_label_config()             # zero-shot pseudo labels; every field: zsp_jax/label/options.py
    c.label.classes = "voc"
    c.label.sam_checkpoint = "runs/smoke/weights/sam_tiny.safetensors"   # random tiny models (synthetic.checkpoints)
    c.label.clip_checkpoint = "runs/smoke/weights/clip_tiny.safetensors"
    c.label.clip_size = 64                       # the tiny CLIP has 8x8 patches: an 8x8 feature grid
    c.label.gem_depth = 3                        # it has 3 vision blocks: GEM on the last 2
    c.label.amg.points_per_side = 8              # random weights: keep candidates (no filters, no NMS)
    c.label.amg.pred_iou_thresh = 0.0
    c.label.amg.stability_score_thresh = 0.0
    c.label.amg.stability_score_offset = 0.05
    c.label.amg.box_nms_thresh = 1.0
    c.label.amg.max_masks = 64
    c.label.threshold = 0.0
    c.label.bucket = 160                         # every generated image (<= 160 px) in one compiled program
    c.label.report_images = 8

    c.stages = "convert,label,train,eval"        # stages to run, in this order (each skips work already done)
    c.verbose = False                            # True: library logs on the console too (always in <workdir>/logs)
    c.distributed = default_distributed_config()  # several processes (jax.distributed): zsp_jax/runtime.py

    c.data_stage = ml_collections.ConfigDict()
    c.data_stage.num_batches = 8
    c.data_stage.preview_images = 4
    return c

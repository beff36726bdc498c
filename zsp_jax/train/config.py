"""The trainer's config fields, stated once (``TRAIN``, ``MODEL``, ``EVAL``, ``CHECKPOINT``: name, default,
meaning; UniMatch V1's PASCAL VOC values), and their start-up checks; every error names its field.

Two trainer families (``model.family``): ``deeplab`` (UniMatch V1's DeepLabV3+, SGD: ``zsp_jax.train.step``)
and ``unimatch_v2`` (UniMatch V2's DINOv2 + DPT head, AdamW and an EMA teacher: ``zsp_jax.train.v2_step``).
The V2 values that differ from V1's (lr 5e-6, head x40, weight decay 0.01, crop 518, ...) are overrides in
``configs/*_v2.py``, not defaults; only what V1 does not have is a field here (``model.encoder``,
``model.lock_backbone``, ``train.ema_cap``, ``train.adam_betas``, ``eval.weights``).

``step_options`` turns the config into the train step's static ``StepOptions`` / ``StepOptionsV2``.
"""

from __future__ import annotations

import ml_collections

from zsp_jax.config_utils import Setting, check_choice, check_range
from zsp_jax.data import config as data_config
from zsp_jax.train import evaluation, state, step, v2_step

PRECISIONS = ("default", "high", "highest")
FAMILIES = state.FAMILIES
# train.mode per family (the deeplab family's are zsp_jax.train.step's, V2's zsp_jax.train.v2_step's)
MODES = {"deeplab": step.MODES, "unimatch_v2": v2_step.MODES}
ENHANCED = {"deeplab": step.ENHANCED, "unimatch_v2": v2_step.ENHANCED}
ENCODERS = state.ENCODERS
EVAL_WEIGHTS = ("ema", "student")
# UniMatch V2's optimiser in each of its configs (pascal / coco / ade20k.yaml), which configs/*_v2.py set:
# AdamW at 5e-6, the head at 40x that, weight decay 0.01
V2_OPTIMISER = {"lr": 5e-6, "head_lr_multiplier": 40.0, "weight_decay": 0.01}

TRAIN = (
    Setting("mode", "zsp", "zsp (the paper) | unimatch (UniMatch V1) | supervised (the labelled images only); "
                           "model.family=unimatch_v2: zsp | unimatch_v2 | supervised"),
    Setting("batch_size", 8, "labelled (= unlabelled) images per step over all devices: UniMatch's 2 x 4 GPUs"),
    Setting("loss_groups", 4, "each loss is normalised per group of the batch, as on UniMatch's 4 GPUs (1: over "
                              "the whole batch)"),
    Setting("crop_size", 321, "training crop (UniMatch: 321 or 513)"),
    Setting("epochs", 80, "passes over the unlabelled set"),
    Setting("max_steps", 0, "stop after this many steps (0: epochs x steps per epoch)"),
    Setting("lr", 0.001, "base learning rate of the backbone (SGD; unimatch_v2: AdamW), poly schedule per step"),
    Setting("lr_power", 0.9, "poly exponent: lr = base x (1 - step / total) ** power"),
    Setting("head_lr_multiplier", 10.0, "learning rate of ASPP + decoder = lr x this"),
    Setting("momentum", 0.9, "SGD momentum (deeplab)"),
    Setting("weight_decay", 1e-4, "added to the gradient before the momentum (torch's SGD); unimatch_v2: AdamW's "
                                  "decoupled decay, lr x this per step"),
    Setting("adam_betas", (0.9, 0.999), "unimatch_v2: AdamW's (beta1, beta2)"),
    Setting("ema_cap", 0.996, "unimatch_v2: the EMA teacher's ratio after step k is min(1 - 1 / (k + 1), this)"),
    Setting("conf_thresh", 0.95, "unimatch: the confidence that lets an unlabelled pixel into the loss"),
    Setting("stream_weights", (0.25, 0.25, 0.5), "unlabelled loss weights: strong 1, strong 2, feature-perturbed "
                                                 "(deeplab; V2's are fixed: (x + (s1 + s2) / 2) / 2)"),
    Setting("label_smoothing", 0.1, "zsp: eps of the label-smoothed cross-entropy of the perturbed streams"),
    Setting("enhanced", "fixed", "zsp enhanced labels: fixed (A) | fusion (B) | relabel (C, deeplab only); "
                                 "docs/training.md"),
    Setting("fusion_thresh", 0.95, "zsp fusion: the confidence at which the model (unimatch_v2: the EMA teacher) "
                                   "overrides or fills Y0"),
    Setting("relabel_first_mode", "unimatch", "zsp relabel: the first run's mode (unimatch | zsp)"),
    Setting("relabel_vote", 0.5, "zsp relabel: the share of a SAM segment the model's class must cover"),
    Setting("fsdp", 1, "devices per parameter shard (1: parameters replicated)"),
    Setting("num_devices", 0, "devices to use, the first N of each process (0: all)"),
    Setting("matmul_precision", "default", "default | high | highest (fp32 parity needs highest)"),
    Setting("compilation_cache", True, "persistent XLA cache in <workdir>/jax_cache, or JAX's own if set "
                                       "(fast resumes)"),
    Setting("log_every", 20, "steps between metric fetches (progress bar, logs, the non-finite check)"),
)
MODEL = (
    Setting("family", "deeplab", "the trainer: deeplab (UniMatch V1: DeepLabV3+, SGD) | unimatch_v2 (UniMatch V2: "
                                 "DINOv2 + DPT head, AdamW, EMA teacher)"),
    Setting("backbone", "r101", "deeplab: r50 | r101 | xception65 | tiny_resnet | tiny_xception"),
    Setting("stem", "deep", "deeplab: ResNet stem: deep (UniMatch's 3 x 3x3) | plain (torchvision's 7x7)"),
    Setting("output_stride", 16, "deeplab: 16 | 8"),
    Setting("encoder", "s", "unimatch_v2: the DINOv2 encoder, s | b | l | g (ViT-S/B/L/g 14; tiny: a 4-block test "
                            "model)"),
    Setting("lock_backbone", False, "unimatch_v2: freeze the encoder (V2's ADE20K setting): no gradient, no update, "
                                    "no decay"),
    Setting("pretrained", "", "deeplab: UniMatch's ImageNet backbone (.pth); unimatch_v2: DINOv2 weights (an "
                              "official dinov2_vit*14_pretrain.pth, a transformers directory); converted once into "
                              "<workdir>/converted (or a converted .safetensors); \"\": random initialisation"),
    Setting("dtype", "float32", "compute dtype: float32 | bfloat16 (parameters stay float32)"),
)
EVAL = (
    Setting("mode", "original", "original (the whole image, UniMatch's; unimatch_v2: resized to multiples of 14 "
                                "and back, as V2) | center_crop (deeplab) | sliding_window"),
    Setting("weights", "ema", "unimatch_v2: the weights the eval stage and zsp_jax.evaluate take from a run: ema "
                              "(the teacher of the best-EMA checkpoint, V2's reported result) | student (of the "
                              "best-student checkpoint)"),
    Setting("bucket", 64, "pad images to multiples of this (static shapes); 0: exact sizes, one program each"),
    Setting("batch_size", 0, "images per evaluation batch over all devices (0: one per device)"),
    Setting("every_epochs", 1, "evaluate every N epochs (0: not at epoch ends)"),
    Setting("every_steps", 0, "and every N steps (0: no)"),
    Setting("at_end", True, "evaluate the final model"),
    Setting("threads", 4, "host threads decoding evaluation images"),
)
CHECKPOINT = (
    Setting("every_steps", 500, "save every N steps, and at every epoch end and evaluation"),
    Setting("keep", 2, "the last N checkpoints are kept, and the best by mIoU besides them (unimatch_v2: the "
                       "student's best and the EMA's best)"),
    Setting("async_save", True, "write in the background"),
)


def family(config: ml_collections.ConfigDict) -> str:
    """``model.family`` (``deeplab`` when a config predates the field)."""
    return config.model.get("family", "deeplab")


def step_options(config: ml_collections.ConfigDict) -> step.StepOptions | v2_step.StepOptionsV2:
    """The train step's static options for ``config``'s family."""
    t = config.train
    if family(config) == "unimatch_v2":
        return v2_step.StepOptionsV2(mode=t.mode, conf_thresh=t.conf_thresh, label_smoothing=t.label_smoothing,
                                     enhanced=t.enhanced, fusion_thresh=t.fusion_thresh,
                                     loss_groups=t.get("loss_groups", 1), ema_cap=t.get("ema_cap", 0.996))
    return step.StepOptions(mode=t.mode, conf_thresh=t.conf_thresh, stream_weights=tuple(t.stream_weights),
                            label_smoothing=t.label_smoothing, enhanced=t.enhanced, fusion_thresh=t.fusion_thresh,
                            loss_groups=t.get("loss_groups", 1))


def validate_for_eval(config: ml_collections.ConfigDict) -> None:
    """The fields evaluation reads: ``data.*``, ``model.*``, ``eval.*``."""
    data_config.validate(config)
    m, e = config.model, config.eval
    check_choice("model.family", family(config), FAMILIES)
    check_choice("model.dtype", m.dtype, tuple(state.DTYPES))
    check_choice("eval.mode", e.mode, evaluation.MODES)
    check_range("eval.bucket", e.bucket, 0, None)
    check_range("eval.batch_size", e.batch_size, 0, None)
    check_range("eval.threads", e.threads, 1, 256)
    if family(config) == "unimatch_v2":
        check_choice("model.encoder", m.get("encoder", "s"), ENCODERS)
        check_choice("eval.weights", e.get("weights", "ema"), EVAL_WEIGHTS)
        if e.mode not in evaluation.MODES_V2:
            raise ValueError(f"config field eval.mode={e.mode!r}: model.family=unimatch_v2 evaluates as UniMatch V2 "
                             f"does, {list(evaluation.MODES_V2)} (V2 has no centre-crop mode)")
        if e.mode == "sliding_window" and config.train.crop_size % state.V2_PATCH:
            raise ValueError(f"config field train.crop_size={config.train.crop_size}: the sliding windows of "
                             f"model.family=unimatch_v2 are crops of this size, which DINOv2 needs to be a multiple "
                             f"of {state.V2_PATCH}")
    else:
        check_choice("model.backbone", m.backbone, state.BACKBONES)
        check_choice("model.stem", m.stem, ("deep", "plain"))
        check_choice("model.output_stride", m.output_stride, (8, 16))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad field (the data fields too, ``data.config.validate``)."""
    validate_for_eval(config)
    t, e, c = config.train, config.eval, config.checkpoint
    fam = family(config)
    modes = MODES[fam]
    if t.mode not in modes:
        raise ValueError(f"config field train.mode={t.mode!r}: model.family={fam} trains {list(modes)}")
    if t.enhanced not in ENHANCED[fam]:
        raise ValueError(f"config field train.enhanced={t.enhanced!r}: model.family={fam} has {list(ENHANCED[fam])}")
    check_choice("train.relabel_first_mode", t.relabel_first_mode, ("unimatch", "zsp"))
    check_choice("train.matmul_precision", t.matmul_precision, PRECISIONS)
    if len(tuple(t.stream_weights)) != 3:
        raise ValueError(f"config field train.stream_weights={t.stream_weights!r}: expected 3 weights "
                         f"(strong 1, strong 2, feature-perturbed)")
    check_range("train.lr_power", t.lr_power, 0.0, None)
    check_range("train.label_smoothing", t.label_smoothing, 0.0, 0.999)
    check_range("train.fusion_thresh", t.fusion_thresh, 0.0, 1.0)
    check_range("train.relabel_vote", t.relabel_vote, 0.0, 1.0)
    check_range("train.max_steps", t.max_steps, 0, None)
    check_range("train.log_every", t.log_every, 1, None)
    check_range("train.fsdp", t.fsdp, 1, None)
    check_range("train.loss_groups", t.get("loss_groups", 1), 1, None)
    if t.batch_size % t.get("loss_groups", 1):
        raise ValueError(f"config field train.loss_groups={t.get('loss_groups')}: train.batch_size={t.batch_size} "
                         f"does not split into that many equal groups")
    if fam == "unimatch_v2":
        if t.crop_size % state.V2_PATCH:
            raise ValueError(f"config field train.crop_size={t.crop_size}: model.family=unimatch_v2 needs a multiple "
                             f"of {state.V2_PATCH} (DINOv2's patch; V2 trains at 518 = 37 x 14)")
        check_range("train.ema_cap", t.get("ema_cap", 0.996), 0.0, 1.0)
        betas = tuple(t.get("adam_betas", (0.9, 0.999)))
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"config field train.adam_betas={t.get('adam_betas')!r}: expected two values in [0, 1)")
        if t.lr <= 0 or t.head_lr_multiplier <= 0:
            raise ValueError(f"config field train.lr={t.lr} / train.head_lr_multiplier={t.head_lr_multiplier}: "
                             f"AdamW needs positive rates")
    check_range("train.num_devices", t.num_devices, 0, None)
    check_range("eval.every_epochs", e.every_epochs, 0, None)
    check_range("eval.every_steps", e.every_steps, 0, None)
    check_range("checkpoint.every_steps", c.every_steps, 0, None)
    check_range("checkpoint.keep", c.keep, 1, None)
    # data.pseudo_labels is checked when training starts (data_config.validate_pseudo_labels): the label
    # stage, which writes it, may run after this check.

"""The trainer's config fields, stated once (``TRAIN``, ``MODEL``, ``EVAL``, ``CHECKPOINT``: name, default,
meaning; UniMatch V1's PASCAL VOC values), and their start-up checks; every error names its field.

``step_options`` turns the config into the train step's static ``StepOptions``.
"""

from __future__ import annotations

import ml_collections

from zsp_jax.config_utils import Setting, check_choice, check_range
from zsp_jax.data import config as data_config
from zsp_jax.train import evaluation, state, step

PRECISIONS = ("default", "high", "highest")

TRAIN = (
    Setting("mode", "zsp", "zsp (the paper) | unimatch (UniMatch V1) | supervised (the labelled images only)"),
    Setting("batch_size", 8, "labelled (= unlabelled) images per step over all devices: UniMatch's 2 x 4 GPUs"),
    Setting("loss_groups", 4, "each loss is normalised per group of the batch, as on UniMatch's 4 GPUs (1: over "
                              "the whole batch)"),
    Setting("crop_size", 321, "training crop (UniMatch: 321 or 513)"),
    Setting("epochs", 80, "passes over the unlabelled set"),
    Setting("max_steps", 0, "stop after this many steps (0: epochs x steps per epoch)"),
    Setting("lr", 0.001, "SGD base learning rate of the backbone, poly schedule per step"),
    Setting("lr_power", 0.9, "poly exponent: lr = base x (1 - step / total) ** power"),
    Setting("head_lr_multiplier", 10.0, "learning rate of ASPP + decoder = lr x this"),
    Setting("momentum", 0.9, "SGD momentum"),
    Setting("weight_decay", 1e-4, "added to the gradient before the momentum (torch's SGD)"),
    Setting("conf_thresh", 0.95, "unimatch: the confidence that lets an unlabelled pixel into the loss"),
    Setting("stream_weights", (0.25, 0.25, 0.5), "unlabelled loss weights: strong 1, strong 2, feature-perturbed"),
    Setting("label_smoothing", 0.1, "zsp: eps of the label-smoothed cross-entropy of the perturbed streams"),
    Setting("enhanced", "fixed", "zsp enhanced labels: fixed (A) | fusion (B) | relabel (C); docs/training.md"),
    Setting("fusion_thresh", 0.95, "zsp fusion: the confidence at which the model overrides or fills Y0"),
    Setting("relabel_first_mode", "unimatch", "zsp relabel: the first run's mode (unimatch | zsp)"),
    Setting("relabel_vote", 0.5, "zsp relabel: the share of a SAM segment the model's class must cover"),
    Setting("fsdp", 1, "devices per parameter shard (1: parameters replicated)"),
    Setting("num_devices", 0, "devices to use, the first N of each process (0: all)"),
    Setting("matmul_precision", "default", "default | high | highest (fp32 parity needs highest)"),
    Setting("compilation_cache", True, "persistent XLA cache in <workdir>/jax_cache (fast resumes)"),
    Setting("log_every", 20, "steps between metric fetches (progress bar, logs, the non-finite check)"),
)
MODEL = (
    Setting("backbone", "r101", "r50 | r101 | xception65 | tiny_resnet | tiny_xception"),
    Setting("stem", "deep", "ResNet stem: deep (UniMatch's 3 x 3x3) | plain (torchvision's 7x7)"),
    Setting("output_stride", 16, "16 | 8"),
    Setting("pretrained", "", "UniMatch's ImageNet backbone (.pth, converted once into <workdir>/converted; or a "
                              ".safetensors); \"\": random initialisation"),
    Setting("dtype", "float32", "compute dtype: float32 | bfloat16 (parameters stay float32)"),
)
EVAL = (
    Setting("mode", "original", "original (the whole image, UniMatch's) | center_crop | sliding_window"),
    Setting("bucket", 64, "pad images to multiples of this (static shapes); 0: exact sizes, one program each"),
    Setting("batch_size", 0, "images per evaluation batch over all devices (0: one per device)"),
    Setting("every_epochs", 1, "evaluate every N epochs (0: not at epoch ends)"),
    Setting("every_steps", 0, "and every N steps (0: no)"),
    Setting("at_end", True, "evaluate the final model"),
    Setting("threads", 4, "host threads decoding evaluation images"),
)
CHECKPOINT = (
    Setting("every_steps", 500, "save every N steps, and at every epoch end and evaluation"),
    Setting("keep", 2, "the last N checkpoints are kept, and the best by mIoU besides them"),
    Setting("async_save", True, "write in the background"),
)


def step_options(config: ml_collections.ConfigDict) -> step.StepOptions:
    t = config.train
    return step.StepOptions(mode=t.mode, conf_thresh=t.conf_thresh, stream_weights=tuple(t.stream_weights),
                            label_smoothing=t.label_smoothing, enhanced=t.enhanced, fusion_thresh=t.fusion_thresh,
                            loss_groups=t.get("loss_groups", 1))


def validate_for_eval(config: ml_collections.ConfigDict) -> None:
    """The fields evaluation reads: ``data.*``, ``model.*``, ``eval.*``."""
    data_config.validate(config)
    m, e = config.model, config.eval
    check_choice("model.backbone", m.backbone, state.BACKBONES)
    check_choice("model.stem", m.stem, ("deep", "plain"))
    check_choice("model.output_stride", m.output_stride, (8, 16))
    check_choice("model.dtype", m.dtype, tuple(state.DTYPES))
    check_choice("eval.mode", e.mode, evaluation.MODES)
    check_range("eval.bucket", e.bucket, 0, None)
    check_range("eval.batch_size", e.batch_size, 0, None)
    check_range("eval.threads", e.threads, 1, 256)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad field (the data fields too, ``data.config.validate``)."""
    validate_for_eval(config)
    t, e, c = config.train, config.eval, config.checkpoint
    check_choice("train.mode", t.mode, step.MODES)
    check_choice("train.enhanced", t.enhanced, step.ENHANCED)
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
    check_range("train.num_devices", t.num_devices, 0, None)
    check_range("eval.every_epochs", e.every_epochs, 0, None)
    check_range("eval.every_steps", e.every_steps, 0, None)
    check_range("checkpoint.every_steps", c.every_steps, 0, None)
    check_range("checkpoint.keep", c.keep, 1, None)
    # data.pseudo_labels is checked when training starts (data_config.validate_pseudo_labels): the label
    # stage, which writes it, may run after this check.

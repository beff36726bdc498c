"""Start-up checks of the trainer's config fields (``model.*``, ``train.*``, ``eval.*``, ``checkpoint.*``);
every error names its field. ``configs/voc.py`` comments every field.

``step_options`` turns the config into the train step's static ``StepOptions``.
"""

from __future__ import annotations

import ml_collections

from zsp_jax.config_utils import check_choice, check_range
from zsp_jax.data import config as data_config
from zsp_jax.train import evaluation, state, step

PRECISIONS = ("default", "high", "highest")


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

"""UniMatch V2's train state, optimiser and EMA teacher (``unimatch_v2.py`` at f6afb4df), for ``v2_step``.

* ``TrainStateV2``: the step count, the fp32 master parameters, the EMA teacher's parameters and
  the optax state. The segmenter (DINOv2 + DPT head) has no BatchNorm and no buffers, so V2's EMA
  of buffers has nothing to average here.
* ``make_optimizer_v2``: V2's ``torch.optim.AdamW`` as optax, exactly:
  - two groups, the encoder at ``lr`` and the head at ``lr * lr_multi`` (V2: 40), each an
    ``optax.adamw`` (betas (0.9, 0.999), eps 1e-8) whose decoupled decay ``lr_group * wd * p``
    uses the group's own rate (the head decays 40x faster) and applies to every parameter of the
    group (norms, biases, ``pos_embed``, ``cls_token``, LayerScale: V2 passes no decay mask);
  - the parameters torch's AdamW never touches get ``optax.set_to_zero`` (no moments, no update,
    no decay): those whose gradient is None in V2 (``backbone.mask_token``, read only by
    DINOv2's masked-image branch, which V2 never takes; V2's never-run
    ``refinenet4.resConfUnit1`` is not built in ``DptHead``) and, with ``lock_backbone``, the
    whole encoder (V2 leaves frozen parameters out of the optimiser). ``optax.adamw`` alone
    would decay them;
  - the poly rate as V2 sets it, *after* each step for the next one: steps 0 and 1 at ``lr``,
    step k >= 1 at ``lr (1 - (k - 1) / total) ** 0.9`` (``schedule.poly_schedule``, shared with V1).
* ``ema_update``: V2's teacher after step k (0-based): ``ema <- r ema + (1 - r) params`` with
  ``r = min(1 - 1 / (k + 1), 0.996)``, over every parameter (frozen ones too, as V2). So the EMA
  equals the student after step 0 and is the running mean of the students until step 249; a fixed
  ``optax.ema(0.996)`` would differ from V2 for the first few hundred steps.
* ``model_config_v2`` / ``build_model_v2``: the segmenter of ``config.model`` (``encoder`` s / b / l / g /
  tiny, ``lock_backbone``), random, or with DINOv2 weights from ``model.pretrained`` (an official
  ``dinov2_vit*14_pretrain.pth``, a transformers directory, a UniMatch V2 checkpoint's encoder, or a
  converted ``.safetensors``), converted once into ``<workdir>/converted/`` (``pretrained_safetensors_v2``),
  the head randomly initialised, as V2 (``model.backbone.load_state_dict(...)`` on a fresh ``DPT``).
* Mesh, shardings, placement: ``zsp_jax.train.state`` (``make_mesh``, ``state_shardings``, ``place``,
  ``global_batch``, ``batch_sharding``). ``state_shardings`` decides each leaf by its shape, so with
  ``fsdp`` > 1 the parameters, the EMA and both AdamW moments are split alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from zsp_jax.models.dpt import DptConfig, DptSegmenter, param_group_labels
from zsp_jax.train.schedule import poly_schedule
from zsp_jax.utils.converted_files import convert_once, converted_path
from zsp_jax.utils.weights import build_initialised

log = logging.getLogger(__name__)

EMA_CAP = 0.996  # unimatch_v2.py: ema_ratio = min(1 - 1 / (iters + 1), 0.996)
ENCODER_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}  # model.encoder -> V2's size names
# DINOv2's released encoders per model.encoder (UniMatch V2's pretrained/dinov2_<size>.pth are these files renamed)
PRETRAINED_FILES = {"s": "dinov2_vits14_pretrain.pth", "b": "dinov2_vitb14_pretrain.pth",
                    "l": "dinov2_vitl14_pretrain.pth", "g": "dinov2_vitg14_pretrain.pth"}
PRETRAINED_HELP = ("DINOv2 weights: the official dinov2_vits14_pretrain.pth / _vitb14_ / _vitl14_ / _vitg14_ (from "
                   "github.com/facebookresearch/dinov2, what UniMatch V2's README links as pretrained/), a transformers "
                   "Dinov2Model directory, or a .safetensors from tools/convert_dinov2.py; set --config.model.pretrained "
                   "(or '' to start from random weights)")
# Parameters V2's forward never reads (their gradient is None, so torch's AdamW skips them): ``param_name``s.
UNUSED_PARAMS = ("backbone.mask_token",)


@flax.struct.dataclass
class TrainStateV2:
    """What one V2 train step reads and writes.

    Attributes:
      step: () int32, optimiser steps taken so far.
      params: ``nnx.State`` of the segmenter's ``nnx.Param`` (fp32 master weights, also under bf16 compute).
      ema_params: the EMA teacher's parameters, same tree, shapes and dtypes as ``params``.
      opt_state: the optax state (AdamW moments and counts per group).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerSettingsV2:
    """V2's optimiser hyper-parameters as plain values (defaults: ``configs/pascal.yaml`` and ``unimatch_v2.py``).

    Attributes:
      lr: the encoder's base rate (V2: 5e-6 in every shipped config).
      lr_multi: the head's rate is ``lr * lr_multi`` (V2: 40).
      weight_decay: AdamW's decoupled decay (V2: 0.01).
      betas: AdamW's (beta1, beta2) (V2: (0.9, 0.999)).
      eps: AdamW's eps (torch's default 1e-8).
      lr_power: the poly exponent (V2: 0.9).
    """

    lr: float = 5e-6
    lr_multi: float = 40.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_power: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.lr > 0 or not self.lr_multi > 0:
            raise ValueError(f"the learning rate and its head multiplier must be positive: lr={self.lr}, "
                             f"lr_multi={self.lr_multi}")
        if self.weight_decay < 0 or self.eps <= 0 or self.lr_power <= 0:
            raise ValueError(f"weight_decay >= 0, eps > 0 and lr_power > 0 expected: {self}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")


def param_name(path: tuple[Any, ...]) -> str:
    """``"backbone.blocks.0.attn.k.bias"`` from a tree path of an ``nnx.State`` or nested dicts (dict keys and
    sequence indices; the ``.value`` attribute of a Variable is left out)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return ".".join(parts)


def param_labels_v2(params: Any, *, lock_backbone: bool = False) -> Any:
    """The optimiser group of every parameter: ``backbone`` (encoder, base rate), ``head`` (rate x lr_multi) or
    ``frozen`` (no update and no decay: ``UNUSED_PARAMS``, and the whole encoder under ``lock_backbone``).

    Args:
      params: the segmenter's parameter tree (``nnx.State`` or nested dicts with a top-level ``backbone``).
      lock_backbone: V2's ``lock_backbone`` (the model's ``DptConfig.lock_backbone``).

    Returns:
      the same tree with a string label at every leaf.
    """
    groups = param_group_labels(params)

    def label(path: tuple[Any, ...], group: str) -> str:
        if group == "backbone" and (lock_backbone or param_name(path) in UNUSED_PARAMS):
            return "frozen"
        return group

    return jax.tree_util.tree_map_with_path(label, groups)


def make_optimizer_v2(settings: OptimizerSettingsV2, params: Any, total_steps: int, *, lock_backbone: bool = False
                      ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """V2's AdamW for ``params`` (see the module docstring); returns (transformation, encoder schedule).

    ``schedule(k)`` is the encoder's rate of step k (the head's is ``lr_multi`` times it).
    ``lock_backbone`` must be the model's ``DptConfig.lock_backbone``: the model stops the gradient at
    the encoder's outputs and this leaves the encoder out of the update (and out of the decay).
    """
    schedule = poly_schedule(settings.lr, total_steps, settings.lr_power)
    multi = settings.lr_multi

    def head_schedule(count: jax.Array) -> jax.Array:
        return schedule(count) * multi

    def adamw(rate: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(rate, b1=settings.betas[0], b2=settings.betas[1], eps=settings.eps,
                           weight_decay=settings.weight_decay)

    tx = optax.multi_transform({"backbone": adamw(schedule), "head": adamw(head_schedule),
                                "frozen": optax.set_to_zero()},
                               param_labels_v2(params, lock_backbone=lock_backbone))
    return tx, schedule


def ema_ratio(step: jax.Array, cap: float = EMA_CAP) -> jax.Array:
    """V2's EMA ratio after step ``step`` (0-based, the step just taken): ``min(1 - 1 / (step + 1), cap)``
    (V2: cap 0.996, ``train.ema_cap``).

    A weakly typed float: float64 under ``jax_enable_x64`` (fp64 parity), else float32.
    """
    return jnp.minimum(1.0 - 1.0 / (jnp.asarray(step) + 1.0), cap)


def ema_update(ema: Any, params: Any, step: jax.Array, cap: float = EMA_CAP) -> Any:
    """The EMA teacher after step ``step`` (the parameters already updated by it): ``r ema + (1 - r) params``.

    Args:
      ema, params: trees of the same structure (float leaves).
      step: () int, the 0-based index of the step just taken.
      cap: the ratio's cap (``ema_ratio``).

    Returns:
      the new EMA tree, in ``ema``'s dtypes.
    """
    ratio = ema_ratio(step, cap)
    return jax.tree.map(lambda e, p: (e * ratio.astype(e.dtype) + p * (1 - ratio).astype(e.dtype)).astype(e.dtype),
                        ema, params)


def init_state_v2(params: Any, tx: optax.GradientTransformation, ema_params: Any | None = None) -> TrainStateV2:
    """Step 0: the EMA teacher a copy of the parameters (V2's ``deepcopy(model)``) unless given (a resume)."""
    ema = jax.tree.map(jnp.copy, params) if ema_params is None else ema_params
    return TrainStateV2(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params))


# ----------------------------------------------------------------------------------------- from the config


def optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettingsV2:
    """``OptimizerSettingsV2`` of ``config.train`` (``lr``, ``head_lr_multiplier``, ``weight_decay``, ``adam_betas``,
    ``lr_power``; eps is torch's default, as V2)."""
    t = config.train
    return OptimizerSettingsV2(lr=t.lr, lr_multi=t.head_lr_multiplier, weight_decay=t.weight_decay,
                               betas=tuple(t.get("adam_betas", (0.9, 0.999))), lr_power=t.get("lr_power", 0.9))


def model_config_v2(config: ml_collections.ConfigDict) -> DptConfig:
    """The ``DptConfig`` of ``config.model`` (``encoder``, ``lock_backbone``) with ``data.num_classes`` classes."""
    m = config.model
    encoder = m.get("encoder", "s")
    kw = {"num_classes": config.data.num_classes, "lock_backbone": bool(m.get("lock_backbone", False))}
    if encoder == "tiny":
        return DptConfig.tiny(**kw)
    if encoder not in ENCODER_SIZES:
        raise ValueError(f"config field model.encoder={encoder!r}: expected one of {list(ENCODER_SIZES) + ['tiny']}")
    return DptConfig.for_encoder(ENCODER_SIZES[encoder], **kw)


def random_model_v2(dpt_config: DptConfig, seed: int, *, dtype: Any = None) -> DptSegmenter:
    """The segmenter with random weights, built in one jitted call (no RNG stream is kept: V2's only
    randomness, complementary dropout, comes from the step's ``rng``)."""
    return build_initialised(lambda key: DptSegmenter(dpt_config, dtype=dtype, rngs=nnx.Rngs(params=key)), seed)


def pretrained_safetensors_v2(path: str, workdir: str, dpt_config: DptConfig) -> str:
    """``path`` if it is a ``.safetensors`` file, else the DINOv2 source (``.pth`` / transformers directory / V2
    checkpoint) converted once into ``<workdir>/converted/<name>.safetensors``, checked against the config's
    encoder (a later run, or a resume, needs no torch)."""
    from zsp_jax.models.dinov2 import convert as dinov2_convert
    from zsp_jax.utils.weights import ConversionError

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config field model.pretrained={path!r}: no such file or directory; {PRETRAINED_HELP}")
    if path.endswith(".safetensors") and os.path.isfile(path):
        return path

    def convert(out: str) -> None:
        try:
            converted = dinov2_convert.convert_checkpoint(path, variant=dpt_config.encoder)
        except ConversionError as e:
            raise ValueError(f"config field model.pretrained={path!r} does not fit model.encoder "
                             f"({dpt_config.encoder.name}): {e}") from None
        dinov2_convert.save_dinov2(out, converted)

    return convert_once(path, converted_path(path, os.path.join(workdir, "converted")), convert, log=log.info)


def build_model_v2(config: ml_collections.ConfigDict, *, workdir: str | None = None, dtype: Any = None
                   ) -> tuple[DptSegmenter, str]:
    """The V2 segmenter to train: (model, one line saying where its weights come from).

    Random, or the encoder from ``model.pretrained`` (converted once) with a random head. The file's encoder
    must be ``model.encoder``'s (a mismatch names both). ``dtype``: the compute dtype (``state.compute_dtype``;
    None: float32).
    """
    from zsp_jax.models.dinov2 import convert as dinov2_convert
    from zsp_jax.models.dinov2.config import Dinov2Config
    from zsp_jax.utils.weights import assign_weights, flat_weights, load_weights

    dpt_config = model_config_v2(config)
    model = random_model_v2(dpt_config, config.seed, dtype=dtype)
    name = f"UniMatch V2 DPT on DINOv2 {dpt_config.encoder.name}" + (", encoder locked" if dpt_config.lock_backbone
                                                                     else "")
    pretrained = config.model.get("pretrained", "")
    if not pretrained:
        return model, f"{name}, random initialisation"
    path = pretrained_safetensors_v2(pretrained, workdir or os.path.expanduser(config.workdir), dpt_config)
    encoder_weights, meta = load_weights(path, expect={"zsp_jax.model": dinov2_convert.MODEL_NAME})
    stored = Dinov2Config.from_json(meta["zsp_jax.config"])
    diffs = dinov2_convert.config_differences(stored, dpt_config.encoder)
    if diffs:
        raise ValueError(f"config field model.pretrained={pretrained!r}: {path} holds a {stored.variant_name()} "
                         f"encoder, model.encoder={config.model.get('encoder')!r} is {dpt_config.encoder.name}: "
                         + "; ".join(diffs))
    weights = flat_weights(model)  # the random head stays (V2 loads only model.backbone)
    encoder_keys = {k for k in weights if k.startswith("backbone.")}
    given = {"backbone." + k for k in encoder_weights}
    if given != encoder_keys:
        raise ValueError(f"config field model.pretrained={pretrained!r}: {path} does not hold exactly the encoder's "
                         f"weights (missing {sorted(encoder_keys - given)[:4]}, extra {sorted(given - encoder_keys)[:4]})")
    weights.update({"backbone." + k: np.asarray(v) for k, v in encoder_weights.items()})
    assign_weights(model, weights, source_name=path)
    return model, f"{name}, encoder from {path}, head random"


def pretrained_problem_v2(path: str, dpt_config: DptConfig) -> str | None:
    """Why ``model.pretrained`` cannot initialise ``dpt_config``'s encoder (None if it can), read from shapes and
    metadata only (nothing is converted): for the start-up input checks."""
    from zsp_jax.models.dinov2 import convert as dinov2_convert

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return "no such file or directory"
    try:
        if path.endswith(".safetensors") and os.path.isfile(path):
            found = dinov2_convert.read_dinov2_config(path)
        else:
            sd, fmt, _, heads = dinov2_convert.read_checkpoint(path)
            src = "backbone." if fmt == "unimatch_v2" else ""
            layout = "hf" if fmt == "hf" else "official"
            if layout == "official":
                sd = dinov2_convert.unchunk_blocks(sd, src, source_name=path)
            found = dinov2_convert.infer_config(sd, layout, src=src, num_heads=heads or dpt_config.encoder.num_heads,
                                                source_name=path)
    except Exception as e:  # noqa: BLE001 - unreadable, foreign, or torch missing
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    diffs = dinov2_convert.config_differences(found, dpt_config.encoder)
    if diffs:
        return f"it holds a {found.variant_name()} encoder, not {dpt_config.encoder.name} (" + "; ".join(diffs) + ")"
    return None


__all__ = [
    "EMA_CAP",
    "UNUSED_PARAMS",
    "OptimizerSettingsV2",
    "TrainStateV2",
    "build_model_v2",
    "ema_ratio",
    "ema_update",
    "init_state_v2",
    "make_optimizer_v2",
    "model_config_v2",
    "optimizer_settings",
    "param_labels_v2",
    "param_name",
    "pretrained_problem_v2",
    "pretrained_safetensors_v2",
    "random_model_v2",
]

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
    step k >= 1 at ``lr (1 - (k - 1) / total) ** 0.9`` (``state.poly_schedule``, shared with V1).
* ``ema_update``: V2's teacher after step k (0-based): ``ema <- r ema + (1 - r) params`` with
  ``r = min(1 - 1 / (k + 1), 0.996)``, over every parameter (frozen ones too, as V2). So the EMA
  equals the student after step 0 and is the running mean of the students until step 249; a fixed
  ``optax.ema(0.996)`` would differ from V2 for the first few hundred steps.
* Mesh, shardings, placement: ``zsp_jax.train.state`` (``make_mesh``, ``state_shardings``, ``place``,
  ``global_batch``, ``batch_sharding``). ``state_shardings`` decides each leaf by its shape, so with
  ``fsdp`` > 1 the parameters, the EMA and both AdamW moments are split alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from zsp_jax.models.dpt import param_group_labels
from zsp_jax.train.state import poly_schedule

EMA_CAP = 0.996  # unimatch_v2.py: ema_ratio = min(1 - 1 / (iters + 1), 0.996)
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


def ema_ratio(step: jax.Array) -> jax.Array:
    """V2's EMA ratio after step ``step`` (0-based, the step just taken): ``min(1 - 1 / (step + 1), 0.996)``.

    A weakly typed float: float64 under ``jax_enable_x64`` (fp64 parity), else float32.
    """
    return jnp.minimum(1.0 - 1.0 / (jnp.asarray(step) + 1.0), EMA_CAP)


def ema_update(ema: Any, params: Any, step: jax.Array) -> Any:
    """The EMA teacher after step ``step`` (the parameters already updated by it): ``r ema + (1 - r) params``.

    Args:
      ema, params: trees of the same structure (float leaves).
      step: () int, the 0-based index of the step just taken.

    Returns:
      the new EMA tree, in ``ema``'s dtypes.
    """
    ratio = ema_ratio(step)
    return jax.tree.map(lambda e, p: (e * ratio.astype(e.dtype) + p * (1 - ratio).astype(e.dtype)).astype(e.dtype),
                        ema, params)


def init_state_v2(params: Any, tx: optax.GradientTransformation, ema_params: Any | None = None) -> TrainStateV2:
    """Step 0: the EMA teacher a copy of the parameters (V2's ``deepcopy(model)``) unless given (a resume)."""
    ema = jax.tree.map(jnp.copy, params) if ema_params is None else ema_params
    return TrainStateV2(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params))


__all__ = [
    "EMA_CAP",
    "UNUSED_PARAMS",
    "OptimizerSettingsV2",
    "TrainStateV2",
    "ema_ratio",
    "ema_update",
    "init_state_v2",
    "make_optimizer_v2",
    "param_labels_v2",
    "param_name",
]

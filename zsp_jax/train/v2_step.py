"""The UniMatch V2 train step: one pure function ``(state, batch, rng) -> (state, metrics)`` per mode.

Model: ``zsp_jax.models.dpt.DptSegmenter`` (DINOv2 + DPT head; no BatchNorm, no dropout besides
complementary dropout, so train and eval forwards are the same function). State:
``zsp_jax.train.v2_state.TrainStateV2`` (parameters, EMA teacher, AdamW state).

Modes (``StepOptionsV2.mode``):

* ``supervised``: the labelled images only, CE with ignore 255 (V2's ``supervised.py``).
* ``unimatch_v2``: V2's iteration (``unimatch_v2.py`` at f6afb4df, re-stated in
  ``zsp_jax.references.unimatch_v2_step``):
  1. the EMA teacher predicts the weak view (no gradient): confidence (max softmax) and argmax;
  2. each strong view is CutMixed with **the batch flipped**: inside its box, sample i takes
     sample B-1-i's strong view (within each of ``loss_groups`` equal shares, as on each of V2's
     GPUs; an odd share's middle sample mixes with itself); the targets, confidences and ignore
     masks are CutMixed the same way;
  3. the student predicts the labelled images, and ``[strong 1; strong 2]`` with complementary
     dropout: a (B, C) mask m ~ 2 Bernoulli(0.5) scales the encoder features of strong 1,
     ``2 - m`` those of strong 2, with ``int(B/2 * 0.5)`` random rows of each share set to 1 in both;
  4. ``loss = (L_x + (L_s1 + L_s2) / 2) / 2``; ``L_x`` CE over non-ignored pixels; each
     ``L_s = sum(CE * (conf >= conf_thresh) * (ignore != 255)) / count(ignore_cutmixed != 255)``
     (V2's normaliser: every non-padding pixel of the CutMixed view, not the confident ones).
* ``zsp``: the same forwards and CutMix with the zero-shot label Y0 (``pseudo_label``) as the
  strong views' target, label-smoothed CE (eps ``label_smoothing``), 255 ignored, V2's
  normaliser; ``enhanced``: ``fixed`` (Y0) or ``fusion`` (``step.fuse_labels`` with the EMA
  teacher's prediction of the weak view: where it is confident (>= ``fusion_thresh``) and
  disagrees with Y0 or Y0 is uncovered, the prediction).

Then AdamW (``v2_state.make_optimizer_v2``), then the EMA teacher ``ema_update(ema, params, step)``.

One student forward: the labelled images and both strong views go through the model as one
batch ``[labelled; strong 1; strong 2]`` with complementary-dropout rows of ones for the labelled
images. The model couples no samples (no BatchNorm), and multiplying features by 1 is exact, so
this is V2's two forwards (``model(img_x)`` without dropout, ``model(cat(s1, s2), comp_drop=True)``)
computed as one program over a larger batch.

Metrics (scalars; the loss terms and ``grad_norm`` in the parameters' precision, fp64 under fp64
parity tests, the rest fp32): ``loss``, ``loss_x`` (and for the semi-supervised modes ``loss_s``,
``loss_s1``, ``loss_s2``, ``mask_ratio``: V2's logged ratio, confident pixels of the *un-mixed*
weak view over its non-padding pixels; in ``zsp`` the covered share; with ``fusion`` also
``override_ratio``), ``lr`` (the encoder's rate of this step; the head's is ``lr_multi`` times
it), ``ema_ratio``, ``grad_norm``, ``finite`` (1, or 0 when a loss term or the gradient is not
finite: the state is then returned unchanged).

Randomness: the complementary-dropout mask is drawn from ``fold_in(rng, state.step)``
(``comp_drop_masks``), or taken from ``batch["comp_drop_mask"]`` (parity tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zsp_jax.data import device_augment
from zsp_jax.models.dpt import complementary_mask_from_half
from zsp_jax.models.dpt.model import COMP_DROP_KEPT_FRACTION
from zsp_jax.train import losses
from zsp_jax.train.step import _confidence, cutmix_images, fuse_labels
from zsp_jax.train.v2_state import EMA_CAP, TrainStateV2, ema_ratio, ema_update

MODES = ("supervised", "unimatch_v2", "zsp")
ENHANCED = ("fixed", "fusion")
IGNORE = losses.IGNORE
LOSS_TERMS = ("loss", "loss_x", "loss_s", "loss_s1", "loss_s2")


@dataclasses.dataclass(frozen=True)
class StepOptionsV2:
    """What the V2 step computes (static: part of the compiled program).

    Attributes:
      mode: ``supervised``, ``unimatch_v2`` or ``zsp``.
      conf_thresh: V2's confidence threshold of the teacher's pseudo labels (0.95).
      label_smoothing: eps of the label-smoothed CE of the ``zsp`` strong streams.
      enhanced: ``fixed`` or ``fusion`` (``zsp`` only).
      fusion_thresh: confidence at which the teacher's prediction overrides / fills Y0 (``fusion``).
      loss_groups: the batch is cut into this many equal shares, each flipped for CutMix, given its own
        complementary-dropout rows and normalising its own losses, the shares' losses averaged: a V2
        run on that many GPUs (1 = the whole batch is one share).
      ema_cap: the cap of the EMA teacher's ratio (V2: 0.996, ``v2_state.ema_ratio``).
    """

    mode: str = "unimatch_v2"
    conf_thresh: float = 0.95
    label_smoothing: float = 0.1
    enhanced: str = "fixed"
    fusion_thresh: float = 0.95
    loss_groups: int = 1
    ema_cap: float = EMA_CAP

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"config field train.mode={self.mode!r}: expected one of {list(MODES)}")
        if self.enhanced not in ENHANCED:
            raise ValueError(f"config field train.enhanced={self.enhanced!r}: expected one of {list(ENHANCED)}")
        if self.loss_groups < 1:
            raise ValueError(f"config field train.loss_groups={self.loss_groups}: must be >= 1")
        if not 0.0 <= self.ema_cap <= 1.0:
            raise ValueError(f"config field train.ema_cap={self.ema_cap}: expected a value in [0, 1]")

    @property
    def needs_teacher(self) -> bool:
        """Whether the EMA teacher's forward of the weak view is needed (V2's targets, fusion)."""
        return self.mode == "unimatch_v2" or (self.mode == "zsp" and self.enhanced == "fusion")


# ----------------------------------------------------------------------------- pieces


def flip_partner(x: jax.Array, groups: int = 1) -> jax.Array:
    """The CutMix partner of every row: V2's ``x.flip(0)`` within each of ``groups`` equal shares.

    Args:
      x: (B, ...) any dtype; B divisible by ``groups``.
      groups: shares (V2's GPUs).

    Returns:
      (B, ...): row ``g * n + i`` holds row ``g * n + n - 1 - i`` (n = B / groups); with n odd the
      middle row of a share is its own partner.
    """
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"config field train.loss_groups={groups}: the batch of {b} does not split into "
                         f"{groups} equal groups")
    return jnp.flip(x.reshape(groups, b // groups, *x.shape[1:]), axis=1).reshape(x.shape)


def cutmix_flipped(x: jax.Array, box: jax.Array, groups: int = 1) -> jax.Array:
    """V2's CutMix of ``x`` with its flipped batch: the partner's value inside the (B, S, S) bool box.

    ``x``: (B, S, S) maps or (B, S, S, C) images; returns the same shape and dtype.
    """
    if x.ndim == box.ndim + 1:
        return cutmix_images(x, flip_partner(x, groups), box)
    return jnp.where(box, flip_partner(x, groups), x)


def comp_drop_masks(key: jax.Array, batch: int, channels: int, groups: int = 1, dtype: Any = jnp.float32
                    ) -> jax.Array:
    """Complementary-dropout masks for ``[strong 1; strong 2]`` of ``batch`` unlabelled images, drawn per share.

    Args:
      key: a PRNG key.
      batch: B, the unlabelled images per step (divisible by ``groups``).
      channels: C, the encoder width.
      groups: shares (V2's GPUs): each draws its own kept rows, ``int(n * 0.5)`` of its n images.
      dtype: of the mask.

    Returns:
      (2B, C) in {0, 1, 2}: rows [0, B) ``m`` ~ 2 Bernoulli(0.5) for strong 1, rows [B, 2B) ``2 - m``
      for strong 2, kept rows 1 in both (``complementary_mask_from_half``).
    """
    if batch % groups:
        raise ValueError(f"config field train.loss_groups={groups}: the batch of {batch} does not split into "
                         f"{groups} equal groups")
    n = batch // groups
    bern_key, perm_key = jax.random.split(key)
    half = 2 * jax.random.bernoulli(bern_key, 0.5, (batch, channels)).astype(dtype)
    num_kept = int(n * COMP_DROP_KEPT_FRACTION)

    def kept_rows(k: jax.Array) -> jax.Array:
        return jnp.zeros((n,), bool).at[jax.random.permutation(k, n)[:num_kept]].set(True)

    kept = jax.vmap(kept_rows)(jax.random.split(perm_key, groups)).reshape(batch)
    return complementary_mask_from_half(half, kept)


Forward = Callable[..., jax.Array]


def make_forward(graphdef: nnx.GraphDef) -> Forward:
    """``forward(params, images, comp_drop_mask=None) -> logits`` (B, H, W, num_classes) fp32 (fp64 for fp64 images)."""

    def forward(params: Any, images: jax.Array, comp_drop_mask: jax.Array | None = None) -> jax.Array:
        return nnx.merge(graphdef, params)(images, comp_drop_mask=comp_drop_mask)

    return forward


def make_loss_fn(graphdef: nnx.GraphDef, options: StepOptionsV2) -> Callable[..., tuple[jax.Array, Any]]:
    """``loss_fn(params, ema_params, batch, key) -> (loss, metrics)`` for a finalized batch.

    ``batch`` is ``device_augment.finalize``'s output without ``unlabeled_mix``: ``labeled`` (``image``
    (B_l, S, S, 3) float, ``mask`` (B_l, S, S) int32) and, unless supervised, ``unlabeled``
    (``image_w``, ``image_s1``, ``image_s2`` (B, S, S, 3) float, ``ignore_mask`` (B, S, S) int32,
    ``cutmix_box1``, ``cutmix_box2`` (B, S, S) bool, for ``zsp`` ``pseudo_label`` (B, S, S) int32).
    An optional ``batch["comp_drop_mask"]`` (2B, C) replaces the drawn mask (rows [strong 1; strong 2]).
    """
    forward = make_forward(graphdef)
    o = options
    groups = o.loss_groups

    def supervised(params: Any, ema_params: Any, batch: dict[str, Any], key: jax.Array) -> tuple[jax.Array, Any]:
        lab = batch["labeled"]
        logits = forward(params, lab["image"])
        loss_x = losses.mean_over_valid(losses.cross_entropy(logits, lab["mask"]), lab["mask"], groups=groups)
        return loss_x, {"loss": loss_x, "loss_x": loss_x}

    def semi(params: Any, ema_params: Any, batch: dict[str, Any], key: jax.Array) -> tuple[jax.Array, Any]:
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_l, n_u = lab["image"].shape[0], unl["image_w"].shape[0]
        metrics: dict[str, jax.Array] = {}
        if o.needs_teacher:
            conf_w, pred_w = _confidence(forward(ema_params, unl["image_w"]))
        box1, box2 = unl["cutmix_box1"], unl["cutmix_box2"]
        image_s1 = cutmix_flipped(unl["image_s1"], box1, groups)
        image_s2 = cutmix_flipped(unl["image_s2"], box2, groups)

        images = jnp.concatenate([lab["image"], image_s1, image_s2])
        mask_dtype = jnp.promote_types(images.dtype, jnp.float32)
        drop = batch.get("comp_drop_mask")
        if drop is None:
            drop = comp_drop_masks(key, n_u, embed_dim(params), groups, mask_dtype)
        # labelled rows: no dropout (V2's separate model(img_x)); see the module docstring
        drop = jnp.concatenate([jnp.ones((n_l, drop.shape[1]), mask_dtype), drop.astype(mask_dtype)])
        logits = forward(params, images, drop)
        logits_x, logits_s1, logits_s2 = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]

        ign = unl["ignore_mask"]
        ign1, ign2 = cutmix_flipped(ign, box1, groups), cutmix_flipped(ign, box2, groups)
        if o.mode == "unimatch_v2":
            target1, conf1 = cutmix_flipped(pred_w, box1, groups), cutmix_flipped(conf_w, box1, groups)
            target2, conf2 = cutmix_flipped(pred_w, box2, groups), cutmix_flipped(conf_w, box2, groups)
            counted1 = (conf1 >= o.conf_thresh) & (ign1 != IGNORE)
            counted2 = (conf2 >= o.conf_thresh) & (ign2 != IGNORE)
            counted_w = (conf_w >= o.conf_thresh) & (ign != IGNORE)
            smoothing = 0.0
        else:
            y0 = unl["pseudo_label"]
            if o.enhanced == "fusion":
                fused = fuse_labels(y0, pred_w, conf_w, o.fusion_thresh)
                covered = (y0 != IGNORE) & (ign != IGNORE)
                metrics["override_ratio"] = (jnp.sum(covered & (fused != y0))
                                             / jnp.maximum(jnp.sum(covered), 1)).astype(jnp.float32)
                y0 = fused
            target1, target2 = cutmix_flipped(y0, box1, groups), cutmix_flipped(y0, box2, groups)
            counted1 = (target1 != IGNORE) & (ign1 != IGNORE)
            counted2 = (target2 != IGNORE) & (ign2 != IGNORE)
            counted_w = (y0 != IGNORE) & (ign != IGNORE)
            smoothing = o.label_smoothing

        loss_x = losses.mean_over_valid(losses.cross_entropy(logits_x, lab["mask"]), lab["mask"], groups=groups)
        loss_s1 = losses.masked_sum_over(losses.cross_entropy(logits_s1, target1, label_smoothing=smoothing),
                                         counted1, ign1 != IGNORE, groups=groups)
        loss_s2 = losses.masked_sum_over(losses.cross_entropy(logits_s2, target2, label_smoothing=smoothing),
                                         counted2, ign2 != IGNORE, groups=groups)
        loss_s = (loss_s1 + loss_s2) / 2.0
        loss = (loss_x + loss_s) / 2.0
        # V2's logged mask ratio: the un-mixed weak view's counted pixels over its non-padding pixels.
        mask_ratio = jnp.sum(counted_w) / jnp.maximum(jnp.sum(ign != IGNORE), 1)
        metrics.update(loss=loss, loss_x=loss_x, loss_s=loss_s, loss_s1=loss_s1, loss_s2=loss_s2,
                       mask_ratio=mask_ratio.astype(jnp.float32))
        return loss, metrics

    def embed_dim(params: Any) -> int:
        return nnx.merge(graphdef, params).config.embed_dim  # a Python int, read at trace time

    return supervised if o.mode == "supervised" else semi


def make_update_fn_v2(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, options: StepOptionsV2,
                      schedule: optax.Schedule | None = None, *, return_grads: bool = False
                      ) -> Callable[..., tuple[Any, ...]]:
    """``update(state, batch, rng) -> (state, metrics)`` on a finalized batch (see ``make_loss_fn``).

    The gradient of the loss, ``tx`` (``make_optimizer_v2``), then the EMA teacher (``ema_update`` with the
    index of the step just taken). Jit it with the state donated. ``schedule`` adds the ``lr`` metric;
    ``return_grads`` adds the gradients as a third output (parity tests).
    """
    loss_fn = make_loss_fn(graphdef, options)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainStateV2, batch: dict[str, Any], rng: jax.Array) -> tuple[Any, ...]:
        key = jax.random.fold_in(rng, state.step)
        (_, metrics), grads = grad_fn(state.params, state.ema_params, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        for v in metrics.values():
            finite &= jnp.all(jnp.isfinite(v))

        def apply() -> TrainStateV2:
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainStateV2(step=state.step + 1, params=params,
                                ema_params=ema_update(state.ema_params, params, state.step, options.ema_cap),
                                opt_state=new_opt)

        # A non-finite step is not applied (the state stays the last good one); a cond, not a select, so the
        # update is made in place in the donated buffers (as zsp_jax.train.step).
        new = jax.lax.cond(finite, apply, lambda: state)
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                       ema_ratio=jnp.asarray(ema_ratio(state.step, options.ema_cap), jnp.float32))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return (new, metrics, grads) if return_grads else (new, metrics)

    return update


def make_train_step_v2(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, options: StepOptionsV2,
                       schedule: optax.Schedule | None = None
                       ) -> Callable[..., tuple[TrainStateV2, dict[str, jax.Array]]]:
    """``step(state, host_batch, rng) -> (state, metrics)``: ``device_augment.finalize`` (strong views,
    normalisation) and the update in one program, on the pipeline's uint8 batch (``labeled`` and, unless
    supervised, ``unlabeled``; no ``unlabeled_mix``: V2's CutMix partner is the flipped batch)."""
    update = make_update_fn_v2(graphdef, tx, options, schedule)

    def step(state: TrainStateV2, host_batch: dict[str, Any], rng: jax.Array
             ) -> tuple[TrainStateV2, dict[str, jax.Array]]:
        return update(state, device_augment.finalize(host_batch), rng)

    return step


__all__ = [
    "ENHANCED",
    "LOSS_TERMS",
    "MODES",
    "StepOptionsV2",
    "comp_drop_masks",
    "cutmix_flipped",
    "flip_partner",
    "make_forward",
    "make_loss_fn",
    "make_train_step_v2",
    "make_update_fn_v2",
]

"""The train step: one pure function ``(state, batch, rng) -> (state, metrics)`` per mode.

Modes (``config.train.mode``):

* ``supervised``: the labelled images only, CE with ignore 255 (UniMatch's ``supervised.py``).
* ``unimatch``: UniMatch's step (``unimatch.py``, re-stated from the published code):
  1. the mix batch's weak view in **eval mode** (running BN statistics, no gradient) gives
     (confidence, argmax) for the CutMix partners;
  2. each strong view is CutMixed with the mix batch's strong view of the same index (images
     inside the box come from the mix image);
  3. a train-mode forward of ``[labelled; weak]`` with the feature perturbation (one decoder
     pass over ``[clean; channel-dropped]`` features) gives the labelled logits, the weak
     predictions (no gradient: they are the targets) and the perturbed predictions;
  4. a train-mode forward of ``[strong 1; strong 2]``;
  5. targets: the weak argmax, inside each box the mix argmax (and its confidence and ignore
     mask); a pixel counts if its confidence >= ``conf_thresh`` and it is not padding;
  6. ``loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2``; each unlabelled term is the sum
     of the counted pixels' CE divided by the number of non-padding pixels (the reference's
     normaliser, not the number of confident pixels).
  The two train-mode forwards update the BatchNorm running statistics in that order, as the
  reference's two calls do.
* ``zsp`` (the paper): the same two train-mode forwards and CutMix, with the zero-shot
  pseudo labels as the targets of the perturbed streams (strong 1, strong 2 with the mix
  image's label inside the box, and the feature-perturbed weak view), label-smoothed CE
  (eps = ``label_smoothing``), ``L = (L_s + L_u) / 2`` with ``L_u = 0.25 L_s1 + 0.25 L_s2 +
  0.5 L_fp`` and UniMatch's normaliser. How the zero-shot label Y0 becomes the enhanced label
  (``enhanced``; the paper does not say, docs/training.md):
    - ``fixed`` (A): Y0 itself (255 = uncovered is ignored);
    - ``fusion`` (B): Y0 where the weak-view prediction agrees with it or is not confident
      (confidence < ``fusion_thresh``); the confident prediction where it disagrees, and where
      Y0 is uncovered; ignore where Y0 is uncovered and the prediction is not confident. The
      mix partners' labels are fused with the eval-mode mix prediction, as in UniMatch;
    - ``relabel`` (C) trains as ``fixed`` on maps relabelled inside SAM segments by a first
      training run (``zsp_jax.train.relabel``).

Randomness: the feature-perturbation masks are drawn from ``fold_in(rng, state.step)``, so a
step depends on (state, batch, rng) only; the strong views' draws come with the batch
(per-element seeds). A non-finite loss or gradient leaves the state unchanged and reports
``finite = 0`` (the loop stops and names the step and the loss term).

Shapes: B labelled + B unlabelled (+ B mix) images of S x S per step; logits are fp32 (also
under bf16 compute).
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
from zsp_jax.train import losses
from zsp_jax.train.state import TrainState

MODES = ("supervised", "unimatch", "zsp")
ENHANCED = ("fixed", "fusion", "relabel")
IGNORE = losses.IGNORE
LOSS_TERMS = ("loss", "loss_x", "loss_s1", "loss_s2", "loss_fp")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step computes (static: part of the compiled program).

    Attributes:
      mode: ``supervised``, ``unimatch`` or ``zsp``.
      conf_thresh: UniMatch's confidence threshold of the weak-view pseudo labels.
      stream_weights: weights of (strong 1, strong 2, feature-perturbed) in the unlabelled loss.
      label_smoothing: eps of the label-smoothed CE of the ``zsp`` perturbed streams.
      enhanced: ``fixed``, ``fusion`` or ``relabel`` (``zsp`` only; ``relabel`` trains as ``fixed``).
      fusion_thresh: confidence at which the model's prediction overrides / fills Y0 (``fusion``).
      loss_groups: each loss is normalised within this many equal groups of the batch and the groups'
        losses averaged (a multi-GPU UniMatch run: its GPU count; 1 = over the whole batch).
    """

    mode: str = "unimatch"
    conf_thresh: float = 0.95
    stream_weights: tuple[float, float, float] = (0.25, 0.25, 0.5)
    label_smoothing: float = 0.1
    enhanced: str = "fixed"
    fusion_thresh: float = 0.95
    loss_groups: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"config field train.mode={self.mode!r}: expected one of {list(MODES)}")
        if self.enhanced not in ENHANCED:
            raise ValueError(f"config field train.enhanced={self.enhanced!r}: expected one of {list(ENHANCED)}")

    @property
    def needs_mix_prediction(self) -> bool:
        """Whether the eval-mode forward of the mix batch is needed (UniMatch's targets, fusion)."""
        return self.mode == "unimatch" or (self.mode == "zsp" and self.enhanced == "fusion")


Forward = Callable[..., tuple[Any, Any]]


def make_forward(graphdef: nnx.GraphDef) -> Forward:
    """``forward(params, stats, x, train=..., need_fp=..., fp_key=..., fp_masks=...) -> (out, new_stats)``."""

    def forward(params: Any, stats: Any, x: jax.Array, *, train: bool, need_fp: bool = False,
                fp_key: jax.Array | None = None, fp_masks: tuple[jax.Array, jax.Array] | None = None
                ) -> tuple[Any, Any]:
        # Fresh Variables at the current trace level (tree.map rebuilds them): the statistics may come
        # from an outer trace (a non-differentiated argument of value_and_grad).
        model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, stats))
        out = model(x, train=train, need_fp=need_fp, rngs=fp_key, fp_masks=fp_masks)
        return out, nnx.state(model, nnx.BatchStat)

    return forward


def _confidence(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max softmax probability, argmax) over the class axis of (..., C) logits, without gradient."""
    logits = jax.lax.stop_gradient(logits)
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def cutmix_images(image: jax.Array, mix_image: jax.Array, box: jax.Array) -> jax.Array:
    """(B, S, S, 3) images with the mix images pasted inside the (B, S, S) bool boxes."""
    return jnp.where(box[..., None], mix_image, image)


def cutmix_targets(box: jax.Array, *pairs: tuple[jax.Array, jax.Array]) -> list[jax.Array]:
    """For each (own, mix) pair of (B, S, S) maps: the mix value inside the box, the own value outside."""
    return [jnp.where(box, mix, own) for own, mix in pairs]


def fuse_labels(zero_shot: jax.Array, pred: jax.Array, conf: jax.Array, thresh: float) -> jax.Array:
    """Enhanced-label option B: Y0 where the prediction agrees or is unsure, the confident prediction
    where it disagrees or Y0 is uncovered (255), ignore where Y0 is uncovered and the prediction unsure."""
    confident = conf >= thresh
    uncovered = zero_shot == IGNORE
    covered_target = jnp.where(confident & (pred != zero_shot), pred, zero_shot)
    return jnp.where(uncovered, jnp.where(confident, pred, IGNORE), covered_target)


def make_loss_fn(graphdef: nnx.GraphDef, options: StepOptions) -> Callable[..., tuple[jax.Array, Any]]:
    """``loss_fn(params, stats, batch, fp_key) -> (loss, (metrics, new_stats))`` for a finalized batch.

    ``batch`` is ``device_augment.finalize``'s output (float images, int32 masks, bool boxes);
    an optional ``batch["fp_masks"] = (mask_c1 (2B, C_low), mask_c4 (2B, C_high))`` replaces the
    drawn feature-perturbation masks (parity tests), rows in ``[labelled; weak]`` order.
    """
    forward = make_forward(graphdef)
    o = options
    w1, w2, wfp = o.stream_weights

    def supervised(params: Any, stats: Any, batch: dict[str, Any], fp_key: jax.Array) -> tuple[jax.Array, Any]:
        lab = batch["labeled"]
        logits, stats = forward(params, stats, lab["image"], train=True)
        loss_x = losses.mean_over_valid(losses.cross_entropy(logits, lab["mask"]), lab["mask"], groups=o.loss_groups)
        return loss_x, ({"loss": loss_x, "loss_x": loss_x}, stats)

    def semi(params: Any, stats: Any, batch: dict[str, Any], fp_key: jax.Array) -> tuple[jax.Array, Any]:
        lab, unl, mix = batch["labeled"], batch["unlabeled"], batch["unlabeled_mix"]
        n_l = lab["image"].shape[0]
        if o.needs_mix_prediction:
            logits_mix, _ = forward(params, stats, mix["image_w"], train=False)  # eval mode, as the reference
            conf_mix, pred_mix = _confidence(logits_mix)
        box1, box2 = unl["cutmix_box1"], unl["cutmix_box2"]
        image_s1 = cutmix_images(unl["image_s1"], mix["image_s1"], box1)
        image_s2 = cutmix_images(unl["image_s2"], mix["image_s2"], box2)

        (logits, logits_fp), stats = forward(params, stats, jnp.concatenate([lab["image"], unl["image_w"]]),
                                             train=True, need_fp=True, fp_key=fp_key, fp_masks=batch.get("fp_masks"))
        logits_x, logits_w, logits_fp = logits[:n_l], logits[n_l:], logits_fp[n_l:]
        logits_s, stats = forward(params, stats, jnp.concatenate([image_s1, image_s2]), train=True)
        logits_s1, logits_s2 = logits_s[:n_l], logits_s[n_l:]
        conf_w, pred_w = _confidence(logits_w)

        ign, ign_mix = unl["ignore_mask"], mix["ignore_mask"]
        ign1, ign2 = cutmix_targets(box1, (ign, ign_mix))[0], cutmix_targets(box2, (ign, ign_mix))[0]
        loss_x = losses.mean_over_valid(losses.cross_entropy(logits_x, lab["mask"]), lab["mask"], groups=o.loss_groups)
        metrics: dict[str, jax.Array] = {}
        if o.mode == "unimatch":
            target1, conf1 = cutmix_targets(box1, (pred_w, pred_mix), (conf_w, conf_mix))
            target2, conf2 = cutmix_targets(box2, (pred_w, pred_mix), (conf_w, conf_mix))
            counted1 = (conf1 >= o.conf_thresh) & (ign1 != IGNORE)
            counted2 = (conf2 >= o.conf_thresh) & (ign2 != IGNORE)
            counted_w = (conf_w >= o.conf_thresh) & (ign != IGNORE)
            smoothing = 0.0
            target_w = pred_w
        else:
            y0, y0_mix = unl["pseudo_label"], mix["pseudo_label"]
            if o.enhanced == "fusion":
                fused, fused_mix = fuse_labels(y0, pred_w, conf_w, o.fusion_thresh), \
                    fuse_labels(y0_mix, pred_mix, conf_mix, o.fusion_thresh)
                covered = (y0 != IGNORE) & (ign != IGNORE)
                metrics["override_ratio"] = (jnp.sum(covered & (fused != y0))
                                             / jnp.maximum(jnp.sum(covered), 1)).astype(jnp.float32)
                y0, y0_mix = fused, fused_mix
            target_w = y0
            target1, = cutmix_targets(box1, (y0, y0_mix))
            target2, = cutmix_targets(box2, (y0, y0_mix))
            counted1 = (target1 != IGNORE) & (ign1 != IGNORE)
            counted2 = (target2 != IGNORE) & (ign2 != IGNORE)
            counted_w = (target_w != IGNORE) & (ign != IGNORE)
            smoothing = o.label_smoothing
        loss_s1 = losses.masked_sum_over(losses.cross_entropy(logits_s1, target1, label_smoothing=smoothing),
                                         counted1, ign1 != IGNORE, groups=o.loss_groups)
        loss_s2 = losses.masked_sum_over(losses.cross_entropy(logits_s2, target2, label_smoothing=smoothing),
                                         counted2, ign2 != IGNORE, groups=o.loss_groups)
        loss_fp = losses.masked_sum_over(losses.cross_entropy(logits_fp, target_w, label_smoothing=smoothing),
                                         counted_w, ign != IGNORE, groups=o.loss_groups)
        loss = (loss_x + w1 * loss_s1 + w2 * loss_s2 + wfp * loss_fp) / 2.0
        # UniMatch's logged mask ratio: counted weak-view pixels over non-padding pixels.
        mask_ratio = jnp.sum(counted_w) / jnp.maximum(jnp.sum(ign != IGNORE), 1)
        metrics.update(loss=loss, loss_x=loss_x, loss_s1=loss_s1, loss_s2=loss_s2, loss_fp=loss_fp,
                       mask_ratio=mask_ratio.astype(jnp.float32))
        return loss, (metrics, stats)

    return supervised if o.mode == "supervised" else semi


def make_update_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, options: StepOptions,
                   schedule: optax.Schedule | None = None, *, return_grads: bool = False
                   ) -> Callable[..., tuple[Any, ...]]:
    """``update(state, batch, rng) -> (state, metrics)`` on a finalized batch (see ``make_loss_fn``).

    ``metrics``: the loss terms, ``mask_ratio``, ``grad_norm``, ``lr`` (backbone, if ``schedule``)
    and ``finite`` (1 if every loss term and the gradient are finite; else the state is returned
    unchanged). Jit it with the state donated. ``return_grads`` adds the gradients as a third
    output (for inspection and the parity test).
    """
    loss_fn = make_loss_fn(graphdef, options)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch: dict[str, Any], rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        fp_key = jax.random.fold_in(rng, state.step)
        (_, (metrics, new_stats)), grads = grad_fn(state.params, state.batch_stats, batch, fp_key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        for v in metrics.values():
            finite &= jnp.all(jnp.isfinite(v))

        def apply() -> TrainState:
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=new_stats, opt_state=new_opt)

        # A non-finite step is not applied: the state stays the last good one. A cond rather than a
        # select over the whole state, so that the update is made in place in the donated buffers
        # instead of beside a second copy of the parameters and momentum.
        new = jax.lax.cond(finite, apply, lambda: state)
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return (new, metrics, grads) if return_grads else (new, metrics)

    return update


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, options: StepOptions,
                    schedule: optax.Schedule | None = None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, host_batch, rng) -> (state, metrics)``: ``device_augment.finalize`` (strong views,
    normalisation) and the update in one program, on the pipeline's uint8 batch."""
    update = make_update_fn(graphdef, tx, options, schedule)

    def step(state: TrainState, host_batch: dict[str, Any], rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        return update(state, device_augment.finalize(host_batch), rng)

    return step

"""Pixel-wise losses of the UniMatch / zsp train step, with the reference's normalisers.

* ``cross_entropy``: per-pixel CE with optional label smoothing (PyTorch's
  ``CrossEntropyLoss(label_smoothing=eps, reduction="none")``: ``(1 - eps) * (-log p_y) +
  eps * mean_c(-log p_c)``, the uniform part over all C classes, y included).
* ``mean_over_valid``: UniMatch's labelled loss (``CrossEntropyLoss(ignore_index=255)``): the
  mean over pixels whose target is not 255.
* ``masked_sum_over``: UniMatch's unlabelled losses: ``sum(loss * mask) / count(normaliser)``,
  where the normaliser counts every non-padding pixel, not only the confident ones
  (``unimatch.py``: ``loss.sum() / (ignore_mask != 255).sum()``).

Logits are (B, H, W, C) fp32 (the model returns fp32 logits even in bf16 compute); targets
int32 (B, H, W) with 255 = ignore.

``groups`` (both normalisers): the batch is cut into ``groups`` equal parts along its first axis,
each part normalised by its own count, and the parts' losses averaged. That is what a multi-GPU
UniMatch run computes: each GPU normalises its own images' loss by its own pixel counts, and DDP
averages the gradients (``train.loss_groups`` = the reference's GPU count). ``groups=1`` normalises
over the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = 255


def cross_entropy(logits: jax.Array, target: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-pixel cross-entropy.

    Args:
      logits: (..., C) float.
      target: (...) int; values outside [0, C) (255 = ignore) give a finite, meaningless value:
        mask them out afterwards.
      label_smoothing: eps in [0, 1).

    Returns:
      (...) float, the loss of each pixel.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    safe = jnp.clip(target, 0, logits.shape[-1] - 1).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """(B, ...) -> (groups, B // groups * prod(...)): each group's values in one row."""
    if x.shape[0] % groups:
        raise ValueError(f"config field train.loss_groups={groups}: the batch of {x.shape[0]} does not split into "
                         f"{groups} equal groups")
    return x.reshape(groups, -1)


def mean_over_valid(loss: jax.Array, target: jax.Array, ignore: int = IGNORE, *, groups: int = 1) -> jax.Array:
    """Mean of a per-pixel loss over pixels whose target is not ``ignore`` (0 if there are none), per group."""
    valid = _grouped((target != ignore).astype(loss.dtype), groups)
    per_group = jnp.sum(_grouped(loss, groups) * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return jnp.mean(per_group)


def masked_sum_over(loss: jax.Array, mask: jax.Array, normaliser: jax.Array, *, groups: int = 1) -> jax.Array:
    """``sum(loss * mask) / count(normaliser)`` per group (both masks bool, loss's shape; 0 if a count is 0)."""
    kept = _grouped(loss * mask.astype(loss.dtype), groups)
    counts = jnp.sum(_grouped(normaliser.astype(loss.dtype), groups), axis=1)
    return jnp.mean(jnp.sum(kept, axis=1) / jnp.maximum(counts, 1.0))

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


def mean_over_valid(loss: jax.Array, target: jax.Array, ignore: int = IGNORE) -> jax.Array:
    """Mean of a per-pixel loss over pixels whose target is not ``ignore`` (0 if there are none)."""
    valid = (target != ignore).astype(loss.dtype)
    return jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def masked_sum_over(loss: jax.Array, mask: jax.Array, normaliser: jax.Array) -> jax.Array:
    """``sum(loss * mask) / count(normaliser)`` (both masks bool, loss's shape; 0 if the count is 0)."""
    return jnp.sum(loss * mask.astype(loss.dtype)) / jnp.maximum(jnp.sum(normaliser.astype(loss.dtype)), 1.0)

"""UniMatch V2's segmenter (``model/semseg/dpt.py``'s ``DPT``): DINOv2 encoder + DPT head, NHWC, Flax NNX.

``DptSegmenter(images)``: the encoder's normalised patch tokens at four blocks
(``config.intermediate_indices``), optionally multiplied by a complementary-dropout mask, the DPT
head (logits at 8x the patch grid), and a bilinear ``align_corners=True`` resize to
``(patch_h * 14, patch_w * 14)`` (``patch_h = H // 14``), as V2.

Complementary dropout (V2's ``forward(x, comp_drop=True)``, used on the concatenated strong views
``cat(u_s1, u_s2)``): a (B, C) mask multiplies every feature level, broadcast over tokens. Its
first half is ``m = 2 * Bernoulli(0.5)`` per (sample, channel), its second half ``2 - m`` (so the
two views keep complementary channels), and ``int(B/2 * 0.5)`` sample pairs, chosen by a random
permutation, are left undropped (all ones in both halves). ``complementary_dropout_mask`` draws
it from a JAX key; ``complementary_mask_from_half`` builds it from given parts; the model takes the
mask (``comp_drop_mask``) or a key (``comp_drop_key``).

Parameter groups: V2 trains the encoder at the base learning rate and the head at ``lr_multi``
(40x); ``BACKBONE_PARAMS`` / ``HEAD_PARAMS`` and ``param_group_labels`` (shared with DeepLabV3+:
the top-level attribute is ``backbone`` or not) split them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.deeplab.model import BACKBONE_PARAMS, HEAD_PARAMS, param_group, param_group_labels
from zsp_jax.models.dpt.config import DptConfig
from zsp_jax.models.dpt.head import DptHead
from zsp_jax.utils.resize import resize_bilinear_align_corners

Array = jax.Array

COMP_DROP_KEPT_FRACTION = 0.5  # V2: num_kept = int(B/2 * (1 - dropout_prob)), dropout_prob = 0.5

__all__ = ["DptSegmenter", "complementary_dropout_mask", "complementary_mask_from_half", "BACKBONE_PARAMS",
           "HEAD_PARAMS", "param_group", "param_group_labels"]


def complementary_mask_from_half(half_mask: Array, kept_rows: Array) -> Array:
    """The (B, C) complementary-dropout mask from its random parts.

    Args:
      half_mask: (B/2, C), values in {0, 2} (V2's ``binomial.sample * 2``), any float dtype.
      kept_rows: (B/2,) bool: sample pairs left undropped (ones in both halves).

    Returns:
      (B, C) in half_mask's dtype: ``[where(kept, 1, m); where(kept, 1, 2 - m)]``.
    """
    one = jnp.ones((), half_mask.dtype)
    kept = kept_rows[:, None]
    return jnp.concatenate([jnp.where(kept, one, half_mask), jnp.where(kept, one, 2 - half_mask)], axis=0)


def complementary_dropout_mask(key: Array, batch: int, channels: int, dtype: Any = jnp.float32) -> Array:
    """Draws V2's complementary-dropout mask for a batch of two stacked views.

    Args:
      key: a JAX PRNG key.
      batch: B, even: rows [0, B/2) scale the first view, [B/2, B) the second (sample i pairs
        with sample B/2 + i).
      channels: C, the encoder width (``config.embed_dim``).
      dtype: the mask's dtype.

    Returns:
      (B, C) with values in {0, 1, 2}: per channel ``m ~ 2 * Bernoulli(0.5)`` for the first half
      and ``2 - m`` for the second, except ``int(B/2 * 0.5)`` random pairs set to 1 in both.
    """
    if batch % 2:
        raise ValueError(f"complementary dropout pairs the two halves of the batch; batch {batch} is odd")
    half = batch // 2
    bern_key, perm_key = jax.random.split(key)
    half_mask = 2 * jax.random.bernoulli(bern_key, 0.5, (half, channels)).astype(dtype)
    num_kept = int(half * COMP_DROP_KEPT_FRACTION)
    rows = jax.random.permutation(perm_key, half)[:num_kept]
    kept = jnp.zeros((half,), bool).at[rows].set(True)
    return complementary_mask_from_half(half_mask, kept)


class DptSegmenter(nnx.Module):
    """DINOv2 + DPT head (UniMatch V2's ``DPT``).

    Call ``model(images)`` with ``images`` (B, H, W, 3) float, ImageNet-normalised (V2's
    preprocessing), H and W multiples of 14 (DINOv2 refuses others; V2 crops to 518 / 798 and
    evaluates at sizes rounded to multiples of 14). Returns logits (B, H, W, num_classes) in fp32
    (fp64 for fp64 images). There is no train/eval difference (no BatchNorm, and no dropout
    besides the explicit complementary dropout).
    """

    def __init__(self, config: DptConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, backbone: nnx.Module | None = None, attention: str = "auto"):
        """Builds the model with random weights.

        Args:
          config: ``DptConfig.small(num_classes)``, ``.base``, ..., ``.tiny()``.
          dtype: compute dtype (None: fp32; ``jnp.bfloat16`` for mixed precision). Logits are
            returned in fp32.
          param_dtype: parameter dtype.
          rngs: ``params`` for initialisation.
          backbone: an encoder module to use instead of ``Dinov2(config.encoder, ...)``; it must
            have ``intermediate_layers(images_nhwc, indices) -> [(B, N, C)] * 4`` (for tests).
          attention: the encoder's softmax-attention implementation (``Dinov2``: "auto", "xla",
            "cudnn", "einsum"; they agree to rounding).
        """
        self.config = config
        self.dtype = dtype
        if backbone is None:
            from zsp_jax.models.dinov2.model import Dinov2

            # Dinov2 takes a concrete compute dtype: fp32, or fp64 for fp64 parameters
            encoder_dtype = dtype if dtype is not None else jnp.promote_types(param_dtype, jnp.float32)
            backbone = Dinov2(config.encoder, dtype=encoder_dtype, param_dtype=param_dtype, rngs=rngs,
                              attention=attention)
        self.backbone = backbone
        self.head = DptHead(config.head, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (H // 14, W // 14) of an input size."""
        p = self.config.patch_size
        return height // p, width // p

    def features(self, images: Array) -> list[Array]:
        """The encoder's 4 normalised patch-token maps (B, h*w, embed_dim), gradient-stopped when
        ``config.lock_backbone`` is set."""
        features = list(self.backbone.intermediate_layers(images, self.config.intermediate_indices))
        if self.config.lock_backbone:
            features = [jax.lax.stop_gradient(f) for f in features]
        return features

    def decode(self, features: Sequence[Array], grid: tuple[int, int], *, comp_drop_mask: Array | None = None,
               out_dtype: Any = jnp.float32) -> Array:
        """Features (4 x (B, h*w, C)) -> logits (B, 14h, 14w, num_classes) in ``out_dtype``; with
        ``comp_drop_mask`` (B, C) every level is multiplied by it first (broadcast over tokens)."""
        if comp_drop_mask is not None:
            b, c = features[0].shape[0], features[0].shape[-1]
            if comp_drop_mask.shape != (b, c):
                raise ValueError(f"comp_drop_mask must be (batch, channels) = {(b, c)}, got {comp_drop_mask.shape}")
            features = [f * comp_drop_mask[:, None, :].astype(f.dtype) for f in features]
        # the final upsampling in the output dtype: it touches only num_classes channels
        logits = self.head(features, grid).astype(out_dtype)
        p = self.config.patch_size
        return resize_bilinear_align_corners(logits, (grid[0] * p, grid[1] * p))

    def __call__(self, images: Array, *, comp_drop_mask: Array | None = None,
                 comp_drop_key: Array | None = None) -> Array:
        """Segmentation logits.

        Args:
          images: (B, H, W, 3) float, ImageNet-normalised, NHWC.
          comp_drop_mask: optional (B, C) complementary-dropout mask (``complementary_dropout_mask``),
            C = ``config.embed_dim``; V2's ``comp_drop=True`` with this mask.
          comp_drop_key: optional PRNG key: draw the mask as V2 does (B must be even). At most one
            of ``comp_drop_mask`` / ``comp_drop_key``.

        Returns:
          (B, H, W, num_classes) fp32 (fp64 for fp64 images); in general (B, 14 * (H // 14),
          14 * (W // 14), num_classes) for an injected encoder that accepts other sizes.
        """
        if comp_drop_mask is not None and comp_drop_key is not None:
            raise ValueError("give comp_drop_mask or comp_drop_key, not both")
        b, h, w, _ = images.shape
        out_dtype = jnp.promote_types(images.dtype, jnp.float32)
        if comp_drop_key is not None:
            comp_drop_mask = complementary_dropout_mask(comp_drop_key, b, self.config.embed_dim, out_dtype)
        return self.decode(self.features(images), self.grid(h, w), comp_drop_mask=comp_drop_mask,
                           out_dtype=out_dtype)

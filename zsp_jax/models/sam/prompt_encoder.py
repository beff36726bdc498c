"""SAM's prompt encoder: points, boxes and mask inputs -> sparse tokens and a dense embedding (NHWC).

Equal to segment-anything's ``PromptEncoder``: random-Fourier positional encoding of
pixel-centre coordinates (``+0.5``), learned embeddings for foreground / background
points, box corners and "not a point" (label -1, which also zeroes the positional part), a
padding point appended when no box is given, and a 2x2/2x2/1x1 conv branch for mask inputs.
Prompts carry two leading axes (B images, N prompts per image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.sam.config import SamConfig
from zsp_jax.models.sam.layers import Dtype, gelu, layer_norm


def _embedding(dim: int, *, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(1, dim, param_dtype=param_dtype, rngs=rngs)


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier features: [sin, cos](2*pi * (2c - 1) @ G) with a fixed Gaussian G (2, D/2)."""

    def __init__(self, num_feats: int, *, param_dtype: Dtype, rngs: nnx.Rngs):
        # Stored with the weights (the reference keeps it as a buffer); never trained.
        self.positional_encoding_gaussian_matrix = nnx.Param(
            jax.random.normal(rngs.params(), (2, num_feats), param_dtype))

    def encode(self, coords: jax.Array) -> jax.Array:
        """(..., 2) coordinates in [0, 1] (x, y) -> (..., D) float32."""
        g = self.positional_encoding_gaussian_matrix.get_value().astype(jnp.float32)
        c = 2 * coords.astype(jnp.float32) - 1
        # A K=2 product written out, so that no backend runs it at reduced (TF32/bf16) precision.
        c = 2 * np.float32(np.pi) * (c[..., 0:1] * g[0] + c[..., 1:2] * g[1])
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)

    def dense(self, h: int, w: int) -> jax.Array:
        """(h, w, D) encoding of the centres of an h x w grid."""
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.encode(grid)


class MaskDownscaling(nnx.Module):
    """(..., 4h, 4w, 1) mask logits -> (..., h, w, D): conv2x2/2 -> LN -> GELU -> conv2x2/2 -> LN -> GELU -> conv1x1."""

    def __init__(self, hidden: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(1, hidden // 4, (2, 2), strides=2, padding="VALID", **kw)
        self.ln1 = layer_norm(hidden // 4, 1e-6, **kw)
        self.conv2 = nnx.Conv(hidden // 4, hidden, (2, 2), strides=2, padding="VALID", **kw)
        self.ln2 = layer_norm(hidden, 1e-6, **kw)
        self.conv3 = nnx.Conv(hidden, dim, (1, 1), padding="VALID", **kw)

    def __call__(self, masks: jax.Array) -> jax.Array:
        lead = masks.shape[:-3]
        x = masks.reshape((-1,) + masks.shape[-3:])
        x = gelu(self.ln1(self.conv1(x)))
        x = gelu(self.ln2(self.conv2(x)))
        x = self.conv3(x)
        return x.reshape(lead + x.shape[1:])


class PromptEncoder(nnx.Module):
    """Sparse (point / box) and dense (mask) prompt embeddings for the mask decoder."""

    def __init__(self, config: SamConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        d = config.prompt_dim
        self.config = config
        self.dtype = dtype
        self.pe_layer = PositionEmbeddingRandom(d // 2, param_dtype=param_dtype, rngs=rngs)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.point_embeddings = nnx.List([_embedding(d, param_dtype=param_dtype, rngs=rngs) for _ in range(4)])
        self.not_a_point_embed = _embedding(d, param_dtype=param_dtype, rngs=rngs)
        self.mask_downscaling = MaskDownscaling(config.mask_in_chans, d, dtype=dtype, param_dtype=param_dtype,
                                                rngs=rngs)
        self.no_mask_embed = _embedding(d, param_dtype=param_dtype, rngs=rngs)

    def _emb(self, e: nnx.Embed) -> jax.Array:
        return e.embedding.get_value()[0].astype(jnp.float32)

    def dense_pe(self) -> jax.Array:
        """(h, w, D) positional encoding of the image-embedding grid, float32."""
        g = self.config.grid_size
        return self.pe_layer.dense(g, g)

    def _normalise(self, coords: jax.Array) -> jax.Array:
        s = float(self.config.image_size)
        return coords.astype(jnp.float32) / jnp.asarray([s, s], jnp.float32)

    def embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """(..., P, 2) pixel (x, y) in the resized-input frame, (..., P) labels -> (..., P[+1], D) float32."""
        coords = coords.astype(jnp.float32) + 0.5
        labels = labels.astype(jnp.int32)
        if pad:
            coords = jnp.concatenate([coords, jnp.zeros(coords.shape[:-2] + (1, 2), coords.dtype)], axis=-2)
            labels = jnp.concatenate([labels, -jnp.ones(labels.shape[:-1] + (1,), labels.dtype)], axis=-1)
        pe = self.pe_layer.encode(self._normalise(coords))
        lab = labels[..., None]
        pe = jnp.where(lab == -1, self._emb(self.not_a_point_embed), pe)
        pe = pe + jnp.where(lab == 0, self._emb(self.point_embeddings[0]), 0.0)
        pe = pe + jnp.where(lab == 1, self._emb(self.point_embeddings[1]), 0.0)
        return pe

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """(..., 4) XYXY in the resized-input frame -> (..., 2, D) float32 (one token per corner)."""
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(boxes.shape[:-1] + (2, 2))
        pe = self.pe_layer.encode(self._normalise(corners))
        corner_emb = jnp.stack([self._emb(self.point_embeddings[2]), self._emb(self.point_embeddings[3])])
        return pe + corner_emb

    def __call__(self, point_coords: jax.Array | None, point_labels: jax.Array | None,
                 boxes: jax.Array | None, mask_inputs: jax.Array | None, batch_shape: tuple[int, int]
                 ) -> tuple[jax.Array, jax.Array]:
        """Embeds the prompts of B images x N prompts.

        Args:
          point_coords: (B, N, P, 2) float (x, y) or None.
          point_labels: (B, N, P) int; 1 foreground, 0 background, -1 padding point.
          boxes: (B, N, 4) XYXY or None.
          mask_inputs: (B, N, 4g, 4g, 1) low-resolution mask logits or None.
          batch_shape: (B, N).

        Returns:
          sparse: (B, N, T, D) float32 with T = P + 1 (points only: a padding point is appended,
            as in the reference), P + 2 (points and box), 2 (box only) or 0.
          dense: (B, N, g, g, D) from the masks, or (1, 1, 1, 1, D) ``no_mask_embed`` that
            broadcasts against the image embedding.
        """
        d = self.config.prompt_dim
        parts = []
        if point_coords is not None:
            parts.append(self.embed_points(point_coords, point_labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        sparse = (jnp.concatenate(parts, axis=-2) if parts
                  else jnp.zeros(tuple(batch_shape) + (0, d), jnp.float32))
        if mask_inputs is not None:
            dense = self.mask_downscaling(mask_inputs.astype(self.dtype))
        else:
            dense = self._emb(self.no_mask_embed).reshape(1, 1, 1, 1, d)
        return sparse, dense

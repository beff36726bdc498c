"""The SAM model: ``embed`` images once, ``decode`` any number of prompts per image in one call."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.attention import check_attention
from zsp_jax.models.sam.config import SamConfig
from zsp_jax.models.sam.image_encoder import ImageEncoder
from zsp_jax.models.sam.layers import KeyStream
from zsp_jax.models.sam.mask_decoder import MaskDecoder
from zsp_jax.models.sam.prompt_encoder import PromptEncoder

MASK_THRESHOLD = 0.0


class Sam(nnx.Module):
    """Segment Anything (image encoder, prompt encoder, mask decoder) in Flax NNX, NHWC.

    Args:
      config: the architecture (``SamConfig.vit_b()``, ...).
      rngs: initialiser randomness (use ``load_sam`` / ``build_with_weights`` for real weights).
      dtype: compute dtype of matmuls and activations (float32 or bfloat16). LayerNorm
        statistics and softmaxes are computed in float32 either way; decoder outputs are float32.
      param_dtype: storage dtype of the weights.
      global_attn_chunk_bytes: compute the global-attention blocks in steps (``lax.map`` over
        blocks of query rows, and of heads if needed) whose float32 logits fit in this many
        bytes; 0 = all at once. The default (None) is 32 MiB on CPU, where cache-sized blocks
        are measured 1.3-1.6x faster per global block than 0 on the development machine
        (its L3 is 32 MiB), and 0 on other backends. Results are the same either way.
      attention: how the encoder's and the decoder's attention is computed: ``"auto"`` (by
        backend), ``"xla"``, ``"cudnn"`` or ``"einsum"`` (see ``zsp_jax.models.attention``). Not
        part of the config: it does not change the weights, and results agree to rounding.

    Both ``embed`` and ``decode`` are pure functions of the weights and their arguments, with
    static shapes, so they can be used under ``jax.jit`` after ``nnx.split`` and with inputs
    sharded over a device mesh along the batch axis.
    """

    def __init__(self, config: SamConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, global_attn_chunk_bytes: int | None = None,
                 attention: str = "auto"):
        check_attention(attention)
        self.config = config
        self.dtype = dtype
        self.attention = attention
        if global_attn_chunk_bytes is None:
            global_attn_chunk_bytes = 32 * 2**20 if jax.default_backend() == "cpu" else 0
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeyStream(rngs))
        self.image_encoder = ImageEncoder(config, global_attn_chunk_bytes=global_attn_chunk_bytes,
                                          attention=attention, **kw)
        self.prompt_encoder = PromptEncoder(config, **kw)
        self.mask_decoder = MaskDecoder(config, attention=attention, **kw)

    def embed(self, images: jax.Array) -> jax.Array:
        """Image encoder.

        Args:
          images: (B, S, S, 3) float32, normalised with ``config.pixel_mean/std`` and zero-padded
            at the bottom/right to S = ``config.image_size`` (see ``transforms.preprocess``).

        Returns:
          (B, S/16, S/16, prompt_dim) embeddings in the compute dtype (256 channels for SAM).
        """
        return self.image_encoder(images)

    def dense_pe(self) -> jax.Array:
        """(g, g, prompt_dim) float32 positional encoding of the embedding grid."""
        return self.prompt_encoder.dense_pe()

    def decode(self, embeddings: jax.Array, point_coords: jax.Array | None, point_labels: jax.Array | None,
               boxes: jax.Array | None = None, mask_inputs: jax.Array | None = None, *,
               multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Prompt encoder + mask decoder for N prompts per image, batched (no loop over prompts).

        Args:
          embeddings: (B, g, g, prompt_dim) from ``embed``.
          point_coords: (B, N, P, 2) float (x, y) pixel coordinates in the resized-input frame
            (``transforms.apply_coords``), or None.
          point_labels: (B, N, P) int; 1 foreground, 0 background, -1 padding point (ignored).
          boxes: (B, N, 4) XYXY in the resized-input frame, or None. Without boxes a padding
            point is appended to the points, as the reference does.
          mask_inputs: (B, N, 4g, 4g, 1) low-resolution logits (e.g. a previous
            ``low_res_logits``), or None.
          multimask_output: static; True -> K = 3 masks per prompt, False -> K = 1.

        Returns:
          low_res_logits: (B, N, K, 4g, 4g) float32 (256 x 256 for SAM at 1024).
          iou_predictions: (B, N, K) float32.
        """
        if point_coords is None and boxes is None and mask_inputs is None:
            raise ValueError("decode needs points, boxes or mask inputs")
        b = embeddings.shape[0]
        first = next(x for x in (point_coords, boxes, mask_inputs) if x is not None)
        n = first.shape[1]
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together")
        sparse, dense = self.prompt_encoder(point_coords, point_labels, boxes, mask_inputs, (b, n))
        return self.mask_decoder(embeddings, self.dense_pe(), sparse, dense, multimask_output=multimask_output)

    def __call__(self, images: jax.Array, point_coords: jax.Array | None, point_labels: jax.Array | None,
                 boxes: jax.Array | None = None, mask_inputs: jax.Array | None = None, *,
                 multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """``decode(embed(images), ...)``."""
        return self.decode(self.embed(images), point_coords, point_labels, boxes, mask_inputs,
                           multimask_output=multimask_output)

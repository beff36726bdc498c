"""SAM's mask decoder: a two-way transformer over prompt tokens and image tokens, NHWC.

Equal to segment-anything's ``MaskDecoder`` + ``TwoWayTransformer``. Prompts carry two
leading axes, B images x N prompts, and all N prompts of an image are decoded in one call.

Work shared by the prompts of an image is done once: without a mask input every prompt
starts from the same image tokens, so the first block's token-to-image keys/values and
image-to-token queries are projected per image (B rows) rather than per prompt (B x N).
Attention goes through ``zsp_jax.models.attention.dot_product_attention`` (the ``attention``
option); keys and values shared by the prompts are not copied per prompt: the prompts' queries
are laid end to end along the query axis of one attention per image (exact, as each query row
attends on its own). The arithmetic per prompt is the reference's, so the results are the same
to rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.attention import dot_product_attention
from zsp_jax.models.sam.config import SamConfig
from zsp_jax.models.sam.layers import MLP, Dtype, MLPBlock, gelu, layer_norm, linear, stride2_transpose_conv


class DecoderAttention(nnx.Module):
    """Attention with an optional internal width reduction (``downsample_rate``).

    Inputs have shape (B, M, T, D) where M is either N (one row per prompt) or 1 (shared by
    all prompts of the image); shared inputs are never broadcast before their projection.
    ``attention`` selects the implementation (``zsp_jax.models.attention``).
    """

    def __init__(self, dim: int, heads: int, downsample_rate: int = 1, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs, attention: str = "auto"):
        internal = dim // downsample_rate
        if internal % heads:
            raise ValueError(f"{heads} heads do not divide the internal width {internal}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.attention = attention
        self.q_proj = linear(dim, internal, **kw)
        self.k_proj = linear(dim, internal, **kw)
        self.v_proj = linear(dim, internal, **kw)
        self.out_proj = linear(internal, dim, **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q (B, Mq, Tq, D), k and v (B, Mk, Tk, D) -> (B, max(Mq, Mk), Tq, D)."""
        split = lambda x: x.reshape(x.shape[:-1] + (self.heads, x.shape[-1] // self.heads))  # noqa: E731
        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))  # (B, M, T, heads, c)
        b, mq, tq, nh, c = q.shape
        mk = k.shape[1]
        if v.shape[1] != mk:
            raise ValueError(f"keys and values are given for {mk} and {v.shape[1]} prompts")
        attend = lambda q, k, v: dot_product_attention(q, k, v, attention=self.attention,  # noqa: E731
                                                       scale=1.0 / math.sqrt(c))
        if mk == 1:  # keys shared by every prompt: one attention per image, the prompts' queries end to end
            out = attend(q.reshape(b, mq * tq, nh, c), k[:, 0], v[:, 0]).reshape(b, mq, tq, nh * c)
        else:
            q = jnp.broadcast_to(q, (b, mk) + q.shape[2:])
            fold = lambda x: x.reshape((b * mk,) + x.shape[2:])  # noqa: E731
            out = attend(fold(q), fold(k), fold(v)).reshape(b, mk, tq, nh * c)
        return self.out_proj(out)


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention (post-norm)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool, *,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, attention: str = "auto"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = DecoderAttention(dim, heads, attention=attention, **kw)
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, downsample_rate, attention=attention, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.mlp = MLPBlock(dim, mlp_dim, jax.nn.relu, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.norm4 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, downsample_rate, attention=attention, **kw)

    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # no residual here, as in the reference
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, config: SamConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            TwoWayAttentionBlock(c.prompt_dim, c.decoder_heads, c.decoder_mlp_dim, c.attention_downsample_rate,
                                 i == 0, attention=attention, **kw)
            for i in range(c.decoder_depth)])
        self.final_attn_token_to_image = DecoderAttention(c.prompt_dim, c.decoder_heads,
                                                          c.attention_downsample_rate, attention=attention, **kw)
        self.norm_final_attn = layer_norm(c.prompt_dim, 1e-5, **kw)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """image (B, M, HW, D), image_pe (HW, D), tokens (B, N, T, D) -> (tokens (B, N, T, D), image (B, N', HW, D))."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class TransposeConv2x2(nnx.Module):
    """torch ``ConvTranspose2d(kernel_size=2, stride=2)``; kernel stored (2, 2, Cin, Cout)."""

    def __init__(self, cin: int, cout: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        bound = 1.0 / math.sqrt(cout * 4)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (2, 2, cin, cout), param_dtype, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), param_dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return stride2_transpose_conv(x.astype(self.dtype), self.kernel.get_value(), self.bias.get_value())


class OutputUpscaling(nnx.Module):
    """(..., h, w, D) -> (..., 4h, 4w, D/8): convT -> LayerNorm2d -> GELU -> convT -> GELU."""

    def __init__(self, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = TransposeConv2x2(dim, dim // 4, **kw)
        self.ln = layer_norm(dim // 4, 1e-6, **kw)
        self.conv2 = TransposeConv2x2(dim // 4, dim // 8, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(self.conv2(gelu(self.ln(self.conv1(x)))))

    def mask_logits(self, x: jax.Array, hyper: jax.Array) -> jax.Array:
        """``einsum(upscaled(x), hyper)`` without materialising the upscaled map in image layout.

        Both transposed convolutions, the LayerNorm and the GELUs act on each embedding cell
        independently, so the 4x4 pixels a cell paints stay trailing axes (a, d) x (b, e) of
        that cell, and only the K mask channels are interleaved into the (4g, 4g) image at the
        end (output row 4h + 2a + d, column 4w + 2b + e) instead of D/4 and D/8 feature
        channels after each convolution. Same arithmetic per pixel as ``__call__``.

        Args:
          x: (B, N, g, g, D) image tokens after the transformer.
          hyper: (B, N, K, D/8) hypernetwork outputs.

        Returns:
          (B, N, K, 4g, 4g) mask logits.
        """
        dt = self.conv1.dtype
        k1, b1 = self.conv1.kernel.get_value().astype(dt), self.conv1.bias.get_value().astype(dt)
        k2, b2 = self.conv2.kernel.get_value().astype(dt), self.conv2.bias.get_value().astype(dt)
        # z: image, n: prompt, (h, w): embedding cell, (a, b) and (d, e): sub-pixel offsets.
        y = jnp.einsum("znhwc,abco->znhwabo", x.astype(dt), k1) + b1
        y = gelu(self.ln(y))
        y = gelu(jnp.einsum("znhwabc,deco->znhwabdeo", y, k2) + b2)
        m = jnp.einsum("znhwabdeo,znko->znkhadwbe", y, hyper.astype(dt))
        z, n, k, g = m.shape[:4]
        return m.reshape(z, n, k, 4 * g, 4 * m.shape[6])


class MaskDecoder(nnx.Module):
    """Image embedding + prompt embeddings -> low-resolution mask logits and IoU predictions."""

    def __init__(self, config: SamConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 attention: str = "auto"):
        c = config
        d = c.prompt_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        self.transformer = TwoWayTransformer(c, attention=attention, **kw)
        self.iou_token = nnx.Embed(1, d, param_dtype=param_dtype, rngs=rngs)
        self.mask_tokens = nnx.Embed(c.num_mask_tokens, d, param_dtype=param_dtype, rngs=rngs)
        self.output_upscaling = OutputUpscaling(d, **kw)
        self.output_hypernetworks_mlps = nnx.List([MLP(d, d, d // 8, 3, **kw) for _ in range(c.num_mask_tokens)])
        self.iou_prediction_head = MLP(d, c.iou_head_hidden_dim, c.num_mask_tokens, c.iou_head_depth, **kw)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array,
                 *, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Decodes N prompts per image.

        Args:
          image_embeddings: (B, g, g, D).
          image_pe: (g, g, D) dense positional encoding.
          sparse: (B, N, T, D) prompt tokens.
          dense: (B, N, g, g, D) mask-input embeddings, or anything that broadcasts to it
            (the no-mask embedding, (1, 1, 1, 1, D)).
          multimask_output: True -> the 3 disambiguating masks (tokens 1..3), False -> token 0.

        Returns:
          low_res_logits (B, N, K, 4g, 4g) float32, iou_predictions (B, N, K) float32.
        """
        b, g, _, d = image_embeddings.shape
        n = sparse.shape[1]
        dt = self.dtype
        out_tokens = jnp.concatenate([self.iou_token.embedding.get_value(), self.mask_tokens.embedding.get_value()])
        out_tokens = jnp.broadcast_to(out_tokens.astype(jnp.float32), (b, n) + out_tokens.shape)
        tokens = jnp.concatenate([out_tokens, sparse.astype(jnp.float32)], axis=2).astype(dt)
        src = image_embeddings.astype(dt)[:, None] + dense.astype(dt)  # (B, 1 or N, g, g, D)
        src = src.reshape(src.shape[0], src.shape[1], g * g, d)
        pos = image_pe.astype(dt).reshape(g * g, d)
        hs, keys = self.transformer(src, pos, tokens)
        keys = jnp.broadcast_to(keys, (b, n) + keys.shape[2:]).reshape(b, n, g, g, d)
        selected = range(1, self.config.num_mask_tokens) if multimask_output else range(0, 1)
        hyper_in = jnp.stack([self.output_hypernetworks_mlps[i](hs[:, :, 1 + i]) for i in selected], axis=2)
        masks = self.output_upscaling.mask_logits(keys, hyper_in)  # (B, N, K, 4g, 4g)
        iou = self.iou_prediction_head(hs[:, :, 0])
        iou = iou[..., 1:] if multimask_output else iou[..., :1]
        return masks.astype(jnp.float32), iou.astype(jnp.float32)

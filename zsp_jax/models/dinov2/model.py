"""DINOv2 ViT encoder in Flax NNX (NHWC), as UniMatch V2 uses it.

Equal to DINOv2's ``DinoVisionTransformer`` in evaluation mode (``dinov2/models/
vision_transformer.py``; UniMatch V2 ships a copy in ``model/backbone/dinov2.py``):

* patch embedding: a 14 x 14 conv with stride 14 (written as a reshape plus one matmul, the
  layer of ``zsp_jax.models.sam.image_encoder``); like DINOv2's ``PatchEmbed``, an image side
  that is not a multiple of 14 is refused;
* tokens ``[cls, registers..., patches...]``: the positional embedding is added to the class and
  patch tokens before the registers are inserted (registers carry no position);
* the positional embedding (a 37 x 37 grid plus the class position) is resampled to the patch
  grid of the input exactly as DINOv2 does (``Dinov2Config.interpolate_offset``): torch's
  bicubic called with ``scale_factor=(gh + 0.1) / 37`` (``bicubic_scale_factor_matrix``), or with
  ``size=`` for offset 0 (registers), in float32, and kept as it is only for 518 x 518 inputs
  (DINOv2's ``npatch == N and w == h`` test);
* pre-LN blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(ffn(norm2(x)))`` with LayerScale, exact
  GELU MLP or SwiGLU (``silu(x W1) * (x W2) W3``), LayerNorm eps 1e-6, biases everywhere;
* ``mask_token`` is a parameter (it is in every checkpoint) that the forward never reads (it
  replaces masked patches only in DINOv2's self-supervised training).

The attention's q, k and v projections are stored as three layers (as transformers stores them;
DINOv2's fused ``qkv`` is split by the converter) and applied as one matmul over their
concatenated kernels. The softmax attention itself is ``zsp_jax.models.attention``'s (float32
logits and softmax; ``attention="auto"`` picks cuDNN's fused kernel on NVIDIA GPUs for bf16
compute, XLA elsewhere, the einsum form on CPU).

Every method takes NHWC float images normalised with ImageNet's mean/std
(``normalize_images``), has static shapes (the resampling matrices are compile-time constants
per input size) and runs under ``jax.jit`` with the batch sharded over a mesh.

Written here rather than taken from a library: we know of no maintained JAX/Flax port of DINOv2,
and the ViTs of JAX model zoos neither load DINOv2's checkpoints nor resample the positional
embedding with DINOv2's scale-factor rule; the layers are the project's own (SAM's patch
embedding, linear and LayerNorm helpers, the shared attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.data.augment import MEAN as IMAGENET_MEAN
from zsp_jax.data.augment import STD as IMAGENET_STD
from zsp_jax.data.device_augment import normalize as _normalize_0_255
from zsp_jax.models.attention import check_attention, dot_product_attention
from zsp_jax.models.dinov2.config import Dinov2Config
from zsp_jax.models.sam.image_encoder import PatchEmbed
from zsp_jax.models.sam.layers import KeyStream, gelu, layer_norm, linear
from zsp_jax.utils.resize import bicubic_scale_factor_matrix, resize_matrix

Array = jax.Array
DType = Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Dinov2", "Dinov2Features", "normalize_images", "pos_embed_matrices"]


def normalize_images(images: Array) -> Array:
    """UniMatch V2's input normalisation: ``(x / 255 - mean) / std`` with ImageNet's statistics.

    Args:
      images: (..., 3) uint8 or float RGB in [0, 255].

    Returns:
      float32, same shape (what ``torchvision``'s ``ToTensor`` + ``Normalize(IMAGENET_MEAN,
      IMAGENET_STD)`` gives, channels last).
    """
    return _normalize_0_255(images)


def pos_embed_matrices(config: Dinov2Config, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """DINOv2's resampling of the positional-embedding grid for an image, as two 1-D matrices.

    Args:
      config: gives the grid (37), patch size (14), ``interpolate_offset`` and ``_antialias``.
      height, width: image size in pixels.

    Returns:
      None when DINOv2 keeps the embedding as it is (square image with a 37 x 37 patch grid),
      else ((gh, 37), (gw, 37)) float64 matrices: rows (height) and columns (width) of the grid.

    Raises:
      ValueError: the scale-factor call does not give the patch grid (DINOv2 asserts the same).
    """
    g, p = config.pos_grid, config.patch_size
    gh, gw = height // p, width // p
    if gh * gw == g * g and height == width:
        return None
    aa, offset = config.interpolate_antialias, config.interpolate_offset
    if offset:
        mh = bicubic_scale_factor_matrix(g, (gh + offset) / g, antialias=aa)
        mw = bicubic_scale_factor_matrix(g, (gw + offset) / g, antialias=aa)
        if (mh.shape[0], mw.shape[0]) != (gh, gw):
            raise ValueError(f"interpolate_offset {offset}: torch's scale_factor resize of the {g}x{g} positional "
                             f"embedding gives a {mh.shape[0]}x{mw.shape[0]} grid, not {gh}x{gw}")
        return mh, mw
    return resize_matrix(g, gh, antialias=aa), resize_matrix(g, gw, antialias=aa)


class Dinov2Features(NamedTuple):
    """What ``Dinov2.forward_features`` returns (DINOv2's ``forward_features`` dict, a pytree).

    Attributes:
      cls_token: (B, C) final-normed class token (``x_norm_clstoken``).
      register_tokens: (B, R, C) final-normed registers (R = 0 without registers).
      patch_tokens: (B, gh * gw, C) final-normed patch tokens, row-major over the patch grid.
      prenorm: (B, 1 + R + gh * gw, C) output of the last block before the final norm.
    """

    cls_token: Array
    register_tokens: Array
    patch_tokens: Array
    prenorm: Array


class LayerScale(nnx.Module):
    """x * gamma, per channel."""

    def __init__(self, dim: int, init: float, *, dtype: DType, param_dtype: DType):
        self.gamma = nnx.Param(jnp.full((dim,), init, param_dtype))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return x * self.gamma.get_value().astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention, biases on q/k/v and the output projection."""

    def __init__(self, dim: int, heads: int, *, dtype: DType, param_dtype: DType, rngs: Any, attention: str):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = linear(dim, dim, **kw)
        self.k = linear(dim, dim, **kw)
        self.v = linear(dim, dim, **kw)
        self.proj = linear(dim, dim, **kw)
        self.heads, self.head_dim, self.dtype, self.attention = heads, dim // heads, dtype, attention

    def __call__(self, x: Array) -> Array:
        """(B, T, C) -> (B, T, C)."""
        b, t, c = x.shape
        parts = (self.q, self.k, self.v)
        kernel = jnp.concatenate([p.kernel.get_value() for p in parts], axis=1).astype(self.dtype)
        bias = jnp.concatenate([p.bias.get_value() for p in parts]).astype(self.dtype)
        qkv = (x.astype(self.dtype) @ kernel + bias).reshape(b, t, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i] for i in range(3))  # (B, T, heads, head_dim)
        o = dot_product_attention(q, k, v, attention=self.attention, scale=self.head_dim ** -0.5)
        return self.proj(o.reshape(b, t, c))


class Mlp(nnx.Module):
    """fc2(gelu(fc1(x))), exact (erf) GELU as torch's nn.GELU."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType, param_dtype: DType, rngs: Any):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(dim, hidden, **kw)
        self.fc2 = linear(hidden, dim, **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
    """w3(silu(w1(x)) * w2(x)): DINOv2's ``SwiGLUFFNFused`` (its fused ``w12`` = [w1; w2])."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType, param_dtype: DType, rngs: Any):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = linear(dim, hidden, **kw)
        self.w2 = linear(dim, hidden, **kw)
        self.w3 = linear(hidden, dim, **kw)

    def __call__(self, x: Array) -> Array:
        return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class Block(nnx.Module):
    """Pre-LN block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, config: Dinov2Config, *, dtype: DType, param_dtype: DType, rngs: Any, attention: str):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(c.embed_dim, c.layer_norm_eps, **kw)
        self.attn = Attention(c.embed_dim, c.num_heads, attention=attention, **kw)
        self.norm2 = layer_norm(c.embed_dim, c.layer_norm_eps, **kw)
        ffn = SwiGLU if c.ffn == "swiglu" else Mlp
        self.mlp = ffn(c.embed_dim, c.ffn_hidden_dim, **kw)
        if c.layer_scale_init is None:
            self.ls1 = self.ls2 = None
        else:
            self.ls1 = LayerScale(c.embed_dim, c.layer_scale_init, dtype=dtype, param_dtype=param_dtype)
            self.ls2 = LayerScale(c.embed_dim, c.layer_scale_init, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        """(B, T, C) -> (B, T, C), in the compute dtype."""
        h = self.attn(self.norm1(x))
        x = x + (h if self.ls1 is None else self.ls1(h))
        h = self.mlp(self.norm2(x))
        return x + (h if self.ls2 is None else self.ls2(h))


class Dinov2(nnx.Module):
    """A DINOv2 ViT (S/14, B/14, L/14, g/14, with or without registers), NHWC.

    Args:
      config: the architecture (``Dinov2Config.vit_b14()``, ``.from_name("base")``, ...).
      dtype: compute dtype of matmuls and activations (float32 or bfloat16). LayerNorm
        statistics, softmaxes and the positional-embedding resampling are float32 either way.
      param_dtype: storage dtype of the weights.
      rngs: initialiser randomness (default ``nnx.Rngs(0)``); real weights come from
        ``load_dinov2`` / ``build_dinov2``, which skip the initialisers.
      attention: how softmax attention is computed: "auto" (by backend), "xla", "cudnn" or
        "einsum" (``zsp_jax.models.attention``); the results agree to rounding.

    Methods (all with static shapes, jit- and mesh-friendly; images (B, H, W, 3) float,
    ImageNet-normalised, H and W multiples of 14; gh = H / 14, gw = W / 14, N = gh * gw,
    R = ``config.num_register_tokens``, C = ``config.embed_dim``):

    * ``forward_features(images) -> Dinov2Features`` (also ``__call__``);
    * ``intermediate_layers(images, indices=None) -> list of (B, N, C)``: DINOv2's
      ``get_intermediate_layers(x, n=indices, reshape=False, return_class_token=False, norm=True)``;
    * ``block_outputs(images, indices) -> list of (B, 1 + R + N, C)``: raw block outputs;
    * ``embed(images) -> (B, 1 + R + N, C)``: the tokens entering the first block.
    """

    def __init__(self, config: Dinov2Config, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs | None = None, attention: str = "auto"):
        c = config
        check_attention(attention)
        dtype = jnp.float32 if dtype is None else dtype
        self.config = config
        self.dtype = dtype
        keys = KeyStream(rngs if rngs is not None else nnx.Rngs(0))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=keys)
        dim = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, 3, dim, **kw)
        # DINOv2's initialisers: class token and registers N(0, 1e-6), positional embedding
        # truncated normal 0.02, mask token 0.
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(keys.params(), (1, 1, dim), param_dtype))
        self.pos_embed = nnx.Param(0.02 * jax.random.truncated_normal(
            keys.params(), -2.0, 2.0, (1, c.pos_grid ** 2 + 1, dim), param_dtype))
        self.register_tokens = (nnx.Param(1e-6 * jax.random.normal(
            keys.params(), (1, c.num_register_tokens, dim), param_dtype)) if c.num_register_tokens else None)
        self.mask_token = nnx.Param(jnp.zeros((1, dim), param_dtype))
        self.blocks = nnx.List([Block(c, attention=attention, **kw) for _ in range(c.depth)])
        self.norm = layer_norm(dim, c.layer_norm_eps, **kw)

    # ------------------------------------------------------------------ embedding
    def positional_embedding(self, height: int, width: int) -> Array:
        """(1 + gh * gw, C) float32 positional embedding for an H x W image (``pos_embed_matrices``)."""
        pos = self.pos_embed.get_value()[0].astype(jnp.float32)
        mats = pos_embed_matrices(self.config, height, width)
        if mats is None:
            return pos
        mh, mw = (jnp.asarray(m, jnp.float32) for m in mats)
        g = self.config.pos_grid
        grid = jnp.einsum("ij,jkc,lk->ilc", mh, pos[1:].reshape(g, g, -1), mw, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:1], grid.reshape(mh.shape[0] * mw.shape[0], -1)], axis=0)

    def embed(self, images: Array) -> Array:
        """(B, H, W, 3) normalised images -> (B, 1 + R + N, C) tokens [cls, registers, patches], compute dtype."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) images, got shape {images.shape}")
        b, h, w, _ = images.shape
        p = self.config.patch_size
        if h % p or w % p or h == 0 or w == 0:
            # DINOv2's PatchEmbed asserts the same (transformers' Dinov2Model would crop instead)
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        patches = self.patch_embed(images)  # (B, gh, gw, C)
        patches = patches.reshape(b, -1, patches.shape[-1])
        pos = self.positional_embedding(h, w).astype(self.dtype)
        cls = self.cls_token.get_value().astype(self.dtype) + pos[:1]
        parts = [jnp.broadcast_to(cls, (b, 1, cls.shape[-1]))]
        if self.register_tokens is not None:
            reg = self.register_tokens.get_value().astype(self.dtype)
            parts.append(jnp.broadcast_to(reg, (b, *reg.shape[1:])))
        parts.append(patches.astype(self.dtype) + pos[1:])
        return jnp.concatenate(parts, axis=1)

    # ------------------------------------------------------------------ blocks
    def _block_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = self.config.depth
        if indices is None:
            indices = self.config.intermediate_indices
        if isinstance(indices, (int, np.integer)):  # DINOv2's n: the last n blocks
            if not 1 <= indices <= depth:
                raise ValueError(f"cannot take the last {indices} of {depth} blocks")
            return list(range(depth - int(indices), depth))
        out = [int(i) for i in indices]
        if not out or any(not 0 <= i < depth for i in out) or len(set(out)) != len(out):
            raise ValueError(f"block indices {out} must be distinct and within 0..{depth - 1}")
        return out

    def block_outputs(self, images: Array, indices: int | Sequence[int] | None = None) -> list[Array]:
        """Outputs of the blocks ``indices`` (block i's output is the input of block i + 1).

        Args:
          images: (B, H, W, 3) normalised.
          indices: distinct block indices (returned in this order), an int n for the last n
            blocks (DINOv2's ``n``), or None for ``config.intermediate_indices``. Blocks after
            the largest index are not run.

        Returns:
          list of (B, 1 + R + N, C) in the compute dtype, before the final norm.
        """
        wanted = self._block_indices(indices)
        x = self.embed(images)
        taken: dict[int, Array] = {}
        for i in range(max(wanted) + 1):
            x = self.blocks[i](x)
            if i in wanted:
                taken[i] = x
        return [taken[i] for i in wanted]

    def intermediate_layers(self, images: Array, indices: int | Sequence[int] | None = None, *,
                            norm: bool = True) -> list[Array]:
        """DINOv2's ``get_intermediate_layers(x, n=indices, reshape=False, return_class_token=False, norm=norm)``.

        What UniMatch V2's ``DPT.forward`` feeds its head: block outputs passed through the final
        LayerNorm, class token and registers removed.

        Args:
          images: (B, H, W, 3) normalised, H and W multiples of 14.
          indices: as ``block_outputs``; default ``config.intermediate_indices``.
          norm: apply the final LayerNorm (True, as V2).

        Returns:
          list (one per index) of (B, gh * gw, C) patch tokens, row-major over the patch grid, in
          the compute dtype.
        """
        prefix = self.config.num_prefix_tokens
        outs = self.block_outputs(images, indices)
        return [(self.norm(x) if norm else x)[:, prefix:] for x in outs]

    def forward_features(self, images: Array) -> Dinov2Features:
        """All blocks and the final norm: DINOv2's ``forward_features`` (see ``Dinov2Features``)."""
        x = self.block_outputs(images, 1)[0]
        normed = self.norm(x)
        r = self.config.num_register_tokens
        return Dinov2Features(cls_token=normed[:, 0], register_tokens=normed[:, 1:1 + r],
                              patch_tokens=normed[:, 1 + r:], prenorm=x)

    def __call__(self, images: Array) -> Dinov2Features:
        return self.forward_features(images)

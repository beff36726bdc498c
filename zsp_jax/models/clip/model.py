"""CLIP ViT (vision and text towers) in Flax NNX, with GEM dense features.

Architecture as OpenAI CLIP / open_clip / transformers ``CLIPModel``: pre-LN transformers,
class token and learned positional embedding (resampled for other input sizes), post-LN and
a projection into the joint space; the text tower is causal and pools at the end-of-text
token. ``ClipModel.dense_features`` adds the Grounding Everything Module (GEM) exactly as the
reference ``gem`` package computes it (see ``zsp_jax.models.clip.gem``).

All image inputs are NHWC float arrays already normalised with CLIP's mean/std
(``zsp_jax.models.clip.preprocess``). Everything is batched, has static shapes and runs under
``jax.jit`` with inputs sharded over a mesh's batch axis.

Two exact shortcuts over the reference, because only one token of the last block is read:
``encode_image`` runs the last block's attention query, MLP and residual for the class token
only, and ``encode_text`` for the end-of-text token only (causal attention makes that token's
output independent of later positions, so text inputs may also be cut to the longest prompt).

The layers (``Dense``, ``LayerNorm``, ``Embed``) are written here rather than taken from
``nnx.Linear`` & co. for one reason: those draw a key from an ``nnx.Rngs`` stream per weight, and
under ``nnx.eval_shape`` (which ``build_with_weights`` and the converters use) every draw
updates a traced counter, for which jax 0.10 builds an error message that walks the whole
trace: abstract construction was quadratic (ViT-L/14: 7 s, ViT-B/16: 2.5 s). Here keys come
from ``jax.random.fold_in`` on one key with a Python counter, and the layers keep the state
names of their nnx counterparts (``kernel``, ``bias``, ``scale``, ``embedding``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.attention import check_attention, dot_product_attention, heads_first
from zsp_jax.models.clip import gem as gem_lib
from zsp_jax.models.clip.config import ClipConfig, GemConfig
from zsp_jax.utils.resize import resize_matrix

Array = jax.Array
DType = Any


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    return quick_gelu if name == "quick_gelu" else (lambda x: jax.nn.gelu(x, approximate=False))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps), as ``torch.nn.functional.normalize``."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=axis, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class KeyGen:
    """Initialiser keys: ``fold_in(key, i)`` for i = 1, 2, ... (no traced state, see module docstring)."""

    def __init__(self, key: Array):
        self.key, self.count = key, 0

    def __call__(self) -> Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) as ``nnx.Linear``; computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, keys: KeyGen, dtype: DType, param_dtype: DType):
        self.kernel = nnx.Param(jax.random.normal(keys(), (in_features, out_features), param_dtype)
                                * in_features ** -0.5)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return x.astype(self.dtype) @ self.kernel.get_value().astype(self.dtype) + self.bias.get_value().astype(
            self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with statistics in float32 (also for bf16 compute)."""

    def __init__(self, features: int, *, eps: float, dtype: DType, param_dtype: DType):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, width) as ``nnx.Embed``."""

    def __init__(self, num: int, features: int, *, keys: KeyGen, dtype: DType, param_dtype: DType):
        self.embedding = nnx.Param(jax.random.normal(keys(), (num, features), param_dtype) * 0.02)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections (biases on all four).

    ``attention`` selects the implementation (``zsp_jax.models.attention``), and with it the
    layout of q/k/v (``layout_heads_first``).
    """

    def __init__(self, width: int, heads: int, *, keys: KeyGen, dtype: DType, param_dtype: DType,
                 attention: str = "auto"):
        self.heads = heads
        self.head_dim = width // heads
        self.attention = attention
        kw = dict(keys=keys, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(width, width, **kw)
        self.k = Dense(width, width, **kw)
        self.v = Dense(width, width, **kw)
        self.out = Dense(width, width, **kw)

    @property
    def layout_heads_first(self) -> bool:
        """q/k/v are (B, heads, N, head_dim) for the einsum form (CPU), else (B, N, heads, head_dim)."""
        return heads_first(self.attention)

    def qkv(self, h: Array) -> tuple[Array, Array, Array]:
        """(B, N, C) -> q, k, v each (B, N, heads, head_dim), or (B, heads, N, head_dim) (``layout_heads_first``)."""
        def split(t: Array) -> Array:
            t = t.reshape(*t.shape[:-1], self.heads, self.head_dim)
            return t.swapaxes(-2, -3) if self.layout_heads_first else t

        return split(self.q(h)), split(self.k(h)), split(self.v(h))

    def merge(self, o: Array) -> Array:
        """Attention output in the q/k/v layout -> out-projected (B, N, C)."""
        if not self.layout_heads_first:
            return self.out(o.reshape(*o.shape[:-2], -1))
        # Heads first: the out-projection contracts (heads, head_dim) directly, no transpose materialised.
        kernel = self.out.kernel.get_value().astype(self.out.dtype).reshape(self.heads, self.head_dim, -1)
        y = jnp.einsum("bhnd,hdc->bnc", o.astype(self.out.dtype), kernel)
        return y + self.out.bias.get_value().astype(self.out.dtype)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, keys: KeyGen, dtype: DType, param_dtype: DType):
        kw = dict(keys=keys, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(width, hidden, **kw)
        self.fc2 = Dense(hidden, width, **kw)
        self.act = _activation(act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *, keys: KeyGen, dtype: DType,
                 param_dtype: DType, attention: str = "auto"):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(width, eps=eps, **kw)
        self.attn = Attention(width, heads, keys=keys, attention=attention, **kw)
        self.ln_2 = LayerNorm(width, eps=eps, **kw)
        self.mlp = Mlp(width, mlp_dim, act, keys=keys, **kw)

    def __call__(self, x: Array, *, causal: bool = False, select: Array | None = None) -> Array:
        """Args:
          x: (B, N, C) tokens.
          causal: mask attention to earlier positions (text tower).
          select: optional (B,) int token index per row; only that token is computed as a
            query (the result is then (B, 1, C)). Exact for the token: keys and values still
            come from every position (causally masked).
        """
        h = self.ln_1(x)
        q, k, v = self.attn.qkv(h)
        return self.finish(x, q, k, v, causal=causal, select=select)

    def finish(self, x: Array, q: Array, k: Array, v: Array, *, causal: bool = False,
               select: Array | None = None) -> Array:
        """The block from its q/k/v (``Attention.qkv``) on: attention, residual, MLP (shared with GEM)."""
        mask = None
        is_causal = causal and select is None
        token_axis = 2 if self.attn.layout_heads_first else 1
        if select is not None:
            q = jnp.take_along_axis(q, select[:, None, None, None], axis=token_axis)
            x = jnp.take_along_axis(x, select[:, None, None], axis=1)
            if causal:  # the single query at position s sees keys 0..s
                mask = (jnp.arange(k.shape[token_axis])[None, :] <= select[:, None])[:, None, None, :]
        o = dot_product_attention(q, k, v, attention=self.attn.attention, scale=self.attn.head_dim ** -0.5,
                                  mask=mask, is_causal=is_causal, heads_first=self.attn.layout_heads_first)
        x = x + self.attn.merge(o)
        return x + self.mlp(self.ln_2(x))


class DenseFeatures(NamedTuple):
    """What ``ClipModel.dense_features`` returns (a pytree).

    Attributes:
      tokens: (B, gh, gw, D) GEM patch features in CLIP's joint space, row-major over the
        patch grid (gh = H // patch, gw = W // patch). Not normalised unless requested.
      image_embeds: (B, D) CLIP's global image embedding (class token of the unmodified path),
        identical to ``encode_image``.
      original_tokens: (B, gh, gw, D) patch tokens of the unmodified CLIP path, or None unless
        ``return_original=True`` (GEM's ``return_ori``).
    """

    tokens: Array
    image_embeds: Array
    original_tokens: Array | None = None


class VisionTower(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, keys: KeyGen, dtype: DType, param_dtype: DType, attention: str = "auto"):
        self.cfg = cfg
        self.dtype = dtype
        self.attention = attention
        width, p = cfg.vision_width, cfg.patch_size
        scale = width ** -0.5
        normal = lambda shape, std: nnx.Param(jax.random.normal(keys(), shape, param_dtype) * std)  # noqa: E731
        self.patch_embed = normal((p, p, 3, width), (3 * p * p) ** -0.5)  # conv kernel (kh, kw, in, out)
        self.class_embedding = normal((width,), scale)
        self.pos_embed = normal((cfg.grid_size ** 2 + 1, width), scale)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        eps = cfg.layer_norm_eps
        self.ln_pre = LayerNorm(width, eps=eps, **kw)
        self.blocks = nnx.List([Block(width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.act, eps, keys=keys,
                                      attention=attention, **kw) for _ in range(cfg.vision_layers)])
        self.ln_post = LayerNorm(width, eps=eps, **kw)
        self.proj = normal((width, cfg.embed_dim), scale)

    def positional_embedding(self, gh: int, gw: int) -> Array:
        """(1 + gh * gw, C) positional embedding for a gh x gw patch grid (float32).

        The patch part is resampled bicubically (see ``ClipConfig.pos_embed_antialias``) when
        the grid is not the training grid; the class-token position is kept.
        """
        pos = self.pos_embed.get_value().astype(jnp.float32)
        g = self.cfg.grid_size
        if (gh, gw) == (g, g):
            return pos
        aa = self.cfg.pos_embed_antialias
        mh = jnp.asarray(resize_matrix(g, gh, antialias=aa), jnp.float32)
        mw = jnp.asarray(resize_matrix(g, gw, antialias=aa), jnp.float32)
        grid = pos[1:].reshape(g, g, -1)
        grid = jnp.einsum("ij,jkc,lk->ilc", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:1], grid.reshape(gh * gw, -1)], axis=0)

    def embed(self, images: Array) -> tuple[Array, int, int]:
        """(B, H, W, 3) normalised images -> (B, 1 + gh*gw, C) tokens after ln_pre, gh, gw.

        Rows/columns beyond a multiple of the patch size are ignored, as by the strided
        convolution of the reference.
        """
        b, h, w, _ = images.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        if gh == 0 or gw == 0:
            raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
        x = images[:, : gh * p, : gw * p].astype(self.dtype)
        x = x.reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * 3)
        x = x @ self.patch_embed.get_value().astype(self.dtype).reshape(p * p * 3, -1)
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding(gh, gw).astype(self.dtype)
        return self.ln_pre(x), gh, gw

    def head(self, x: Array) -> Array:
        """ln_post then projection: (..., C) -> (..., D)."""
        return self.ln_post(x) @ self.proj.get_value().astype(self.dtype)

    def __call__(self, images: Array) -> Array:
        """(B, H, W, 3) -> (B, D) global image embedding (class token), not normalised."""
        x, _, _ = self.embed(images)
        blocks = list(self.blocks)
        for blk in blocks[:-1]:
            x = blk(x)
        x = blocks[-1](x, select=jnp.zeros((x.shape[0],), jnp.int32))
        return self.head(x[:, 0])

    def dense(self, images: Array, gem: GemConfig, *, return_original: bool = False) -> DenseFeatures:
        """GEM dense features; see ``ClipModel.dense_features``."""
        x, gh, gw = self.embed(images)
        b = x.shape[0]
        blocks = list(self.blocks)
        n_gem = gem.depth - 1
        if n_gem > len(blocks):
            raise ValueError(f"GEM depth {gem.depth} needs {n_gem} blocks, the model has {len(blocks)}")
        split = len(blocks) - n_gem
        for blk in blocks[:split]:
            x = blk(x)
        x_gem = x
        for i, blk in enumerate(blocks[split:]):
            h = blk.ln_1(x)
            q, k, v = blk.attn.qkv(h)
            x_gem = x_gem + blk.attn.merge(gem_lib.self_self_attention(
                q, k, v, h, gem, attention=self.attention, heads_first=blk.attn.layout_heads_first))
            last = i == n_gem - 1
            select = jnp.zeros((b,), jnp.int32) if last and not return_original else None
            x = blk.finish(x, q, k, v, select=select)
        original = self.head(x[:, 1:]).reshape(b, gh, gw, -1) if return_original else None
        tokens = self.head(x_gem[:, 1:]).reshape(b, gh, gw, -1)
        return DenseFeatures(tokens=tokens, image_embeds=self.head(x[:, 0]), original_tokens=original)


class TextTower(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, keys: KeyGen, dtype: DType, param_dtype: DType, attention: str = "auto"):
        self.cfg = cfg
        self.dtype = dtype
        width = cfg.text_width
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = Embed(cfg.vocab_size, width, keys=keys, **kw)
        self.pos_embed = nnx.Param(jax.random.normal(keys(), (cfg.context_length, width), param_dtype) * 0.01)
        self.blocks = nnx.List([Block(width, cfg.text_heads, cfg.text_mlp_dim, cfg.act, cfg.layer_norm_eps,
                                      keys=keys, attention=attention, **kw) for _ in range(cfg.text_layers)])
        self.ln_final = LayerNorm(width, eps=cfg.layer_norm_eps, **kw)
        self.proj = nnx.Param(jax.random.normal(keys(), (width, cfg.embed_dim), param_dtype) * width ** -0.5)

    def __call__(self, token_ids: Array) -> Array:
        """(C, L) int token ids -> (C, D) text embeddings, not normalised.

        L may be shorter than the context length (positions after the end-of-text token do not
        influence it). The pooled token is the first position of the largest id, i.e. the first
        end-of-text token (49407, the largest id of CLIP's vocabulary) whether the ids are padded
        with 0 (OpenAI, open_clip) or with end-of-text (transformers).
        """
        c, length = token_ids.shape
        if length > self.cfg.context_length:
            raise ValueError(f"token ids of length {length} exceed the context length {self.cfg.context_length}")
        x = self.token_embedding(token_ids) + self.pos_embed.get_value()[:length].astype(self.dtype)
        eot = jnp.argmax(token_ids, axis=-1).astype(jnp.int32)
        blocks = list(self.blocks)
        for blk in blocks[:-1]:
            x = blk(x, causal=True)
        x = blocks[-1](x, causal=True, select=eot)[:, 0]
        return self.ln_final(x) @ self.proj.get_value().astype(self.dtype)


class ClipModel(nnx.Module):
    """CLIP ViT with GEM dense features.

    Args:
      config: the architecture.
      dtype: compute dtype (float32, or bfloat16 for speed; docs/benchmarks.md gives its deviation).
      param_dtype: storage dtype of the weights.
      rngs: initialisers' RNG streams, or ``seed`` (random initialisation is only for tests:
        real use loads converted weights with ``load_clip``).
      attention: how attention is computed: ``"auto"`` (by backend), ``"xla"``, ``"cudnn"`` or
        ``"einsum"`` (see ``zsp_jax.models.attention``). Not part of the config: it does not
        change the weights, and results agree to rounding.
    """

    def __init__(self, config: ClipConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs | None = None, seed: int = 0, attention: str = "auto"):
        check_attention(attention)
        keys = KeyGen(rngs.params() if rngs is not None else jax.random.key(seed))
        self.config = config
        self.attention = attention
        kw = dict(keys=keys, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.visual = VisionTower(config, **kw)
        self.text = TextTower(config, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), param_dtype))  # scalar, as the checkpoints

    def encode_image(self, images: Array) -> Array:
        """(B, H, W, 3) normalised float images -> (B, D) image embeddings, not normalised."""
        return self.visual(images)

    def encode_text(self, token_ids: Array) -> Array:
        """(C, L) int32 token ids (L <= context length) -> (C, D) text embeddings, not normalised."""
        return self.text(token_ids)

    def dense_features(self, images: Array, gem: GemConfig = GemConfig(), *, normalize: bool = False,
                       return_original: bool = False) -> DenseFeatures:
        """GEM dense patch features and the global image embedding.

        Args:
          images: (B, H, W, 3) float images normalised with CLIP's mean/std (any size; GEM's
            default is 448x448, see ``preprocess``). The positional embedding is resampled to
            the (H // patch, W // patch) grid.
          gem: GEM options (depth, iterations, temperature).
          normalize: L2-normalise every token and the global embedding (GEM's matching does
            this before the dot product with text embeddings).
          return_original: also return the patch tokens of the unmodified CLIP path.

        Returns:
          ``DenseFeatures`` with tokens (B, gh, gw, D) and image_embeds (B, D) in ``dtype``.
        """
        out = self.visual.dense(images, gem, return_original=return_original)
        if normalize:
            out = DenseFeatures(*(None if t is None else l2_normalize(t) for t in out))
        return out

    def logits(self, images: Array, token_ids: Array) -> Array:
        """(B, H, W, 3), (C, L) -> (B, C) CLIP logits: exp(logit_scale) * cosine similarity."""
        img = l2_normalize(self.encode_image(images).astype(jnp.float32))
        txt = l2_normalize(self.encode_text(token_ids).astype(jnp.float32))
        return jnp.exp(self.logit_scale.get_value().astype(jnp.float32)) * img @ txt.T


# ----------------------------------------------------------------------------- jitted entry points


def dense_features_fn(model: ClipModel, gem: GemConfig = GemConfig(), *, normalize: bool = False,
                      return_original: bool = False, donate: bool = False):
    """A jitted ``images -> DenseFeatures`` closure over ``model``'s current weights.

    Splits the model once (``nnx.split``) and jits a pure function of (weights, images), which
    avoids NNX's per-call graph traversal. Works unchanged with ``images`` sharded over a mesh's
    batch axis (e.g. ``NamedSharding(mesh, P("data"))``); weights are replicated. ``donate=True``
    donates the images' buffer to XLA (the caller must not use the array afterwards), letting it
    reuse that memory on backends that support donation (not CPU).
    """
    graphdef, state = nnx.split(model)

    def run(state, images):
        return nnx.merge(graphdef, state).dense_features(images, gem, normalize=normalize,
                                                         return_original=return_original)

    run = jax.jit(run, donate_argnums=(1,) if donate else ())

    return lambda images: run(state, images)


def _jitted_method(model: ClipModel, method: str):
    """``method`` of ``model`` as a jitted closure over the model's current weights."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return lambda x: run(state, x)


def encode_text_fn(model: ClipModel):
    """A jitted ``token_ids (C, L) -> (C, D)`` closure over ``model``'s current weights."""
    return _jitted_method(model, "encode_text")


def encode_image_fn(model: ClipModel):
    """A jitted ``images (B, H, W, 3) -> (B, D)`` closure over ``model``'s current weights."""
    return _jitted_method(model, "encode_image")

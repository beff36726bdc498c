"""SAM's image encoder: a ViTDet-style ViT with windowed / global attention and a conv neck, NHWC.

Equal to segment-anything's ``ImageEncoderViT`` (patch 16, absolute position embedding,
decomposed relative position embeddings, windows of 14 tokens with bottom/right padding,
global attention at the configured blocks, neck 1x1 conv -> LayerNorm2d -> 3x3 conv ->
LayerNorm2d), with two exact rewrites that save work:

* The patch embedding (a 16x16 conv with stride 16) is a reshape plus one matmul.
* In windowed blocks the reference pads the *normalised* tokens with zeros and runs the qkv
  projection on the padded grid (64x64 -> 70x70 tokens: 20 % more rows). A zero token
  projects to the bias, so we project the 64x64 tokens only and pad q/k/v with the bias
  vector. The padded keys and values still take part in attention exactly as in the
  reference (they are not masked there either), and the output projection runs on the
  64x64 tokens that survive the crop.

Attention goes through ``zsp_jax.models.attention.dot_product_attention`` (the ``attention``
option: ``jax.nn.dot_product_attention`` with XLA or cuDNN, or the einsum form that is fastest on
CPU, on heads-first operands), float32 logits and softmax. The decomposed relative positions are
its ``bias``: the two tables (q, kh) and (q, kw) broadcast-added into a (q, k) array, which XLA
fuses into the logits on the xla and einsum paths (cuDNN reads it from memory).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.attention import dot_product_attention, heads_first
from zsp_jax.models.sam.config import SamConfig
from zsp_jax.models.sam.layers import Dtype, MLPBlock, gelu, layer_norm, linear


def relative_position_index(size: int) -> np.ndarray:
    """(size, size) int32 table: index of the relative offset ``i - j`` in a (2*size-1)-row table.

    Equal to the reference's ``get_rel_pos`` when query and key sizes are equal (always the
    case in SAM's encoder, whose tables are built for the grid or window size they serve).
    """
    i = np.arange(size)[:, None]
    j = np.arange(size)[None, :]
    return (i - j + size - 1).astype(np.int32)


class PatchEmbed(nnx.Module):
    """(B, S, S, 3) -> (B, S/p, S/p, D): a stride-p conv written as patchify + matmul."""

    def __init__(self, patch: int, in_chans: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.patch = patch
        self.dtype = dtype
        self.proj = nnx.Conv(in_chans, dim, (patch, patch), strides=patch, padding="VALID", dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch
        x = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        kernel = self.proj.kernel.get_value().astype(self.dtype)  # (p, p, c, D)
        y = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel)
        return y + self.proj.bias.get_value().astype(self.dtype)


class EncoderAttention(nnx.Module):
    """Multi-head self-attention with decomposed relative positions, optionally in windows.

    ``window == 0`` means global attention over the whole (grid x grid) token map; ``attention``
    selects the implementation (``zsp_jax.models.attention``).
    """

    def __init__(self, dim: int, heads: int, grid: int, window: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs, chunk_bytes: int = 0, attention: str = "auto"):
        self.heads = heads
        self.chunk_bytes = chunk_bytes
        self.attention = attention
        self.window = window
        self.dtype = dtype
        head_dim = dim // heads
        self.scale = head_dim ** -0.5
        self.qkv = linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        size = window if window > 0 else grid
        # Zero-initialised like the reference; converted checkpoints overwrite them.
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * size - 1, head_dim), param_dtype))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * size - 1, head_dim), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, D) normalised tokens -> (B, H, W, D) attention output (after the projection)."""
        b, h, w, d = x.shape
        qkv = self.qkv(x)  # (B, H, W, 3D)
        if self.window > 0:
            qkv, (nh, nw) = self._partition(qkv)
        else:
            nh = nw = 1
        out = self._attend(qkv)  # (B*nW, wh, ww, D)
        if self.window > 0:
            ws = self.window
            out = out.reshape(b, nh, nw, ws, ws, d).transpose(0, 1, 3, 2, 4, 5)
            out = out.reshape(b, nh * ws, nw * ws, d)[:, :h, :w]
        return self.proj(out)

    def _partition(self, qkv: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """Pads the grid to a multiple of the window (padded tokens = projection of a zero token) and splits it."""
        b, h, w, c = qkv.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            padded = jnp.pad(qkv, ((0, 0), (0, ph), (0, pw), (0, 0)))
            valid = np.zeros((1, h + ph, w + pw, 1), bool)
            valid[:, :h, :w] = True
            bias = self.qkv.bias.get_value().astype(qkv.dtype)
            qkv = jnp.where(valid, padded, bias)
        nh, nw = (h + ph) // ws, (w + pw) // ws
        qkv = qkv.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws, ws, c)
        return qkv, (nh, nw)

    def _attend(self, qkv: jax.Array) -> jax.Array:
        """(B', h, w, 3D) -> (B', h, w, D): softmax(scale q k^T + rel_h + rel_w) v per head.

        q/k/v are heads first, (B', heads, T, hd), for the einsum form (``heads_first``), else
        (B', T, heads, hd); the chunked path works heads first either way.
        """
        b, h, w, c = qkv.shape
        d = c // 3
        nh = self.heads
        first = heads_first(self.attention)
        qkv = qkv.reshape(b, h * w, 3, nh, d // nh)
        if first:
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B', heads, T, hd) each
            rq, grid = q.reshape(b, nh, h, w, -1), "bnyxc"
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B', T, heads, hd) each
            rq, grid = q.reshape(b, h, w, nh, -1), "byxnc"
        rh = self.rel_pos_h.get_value().astype(q.dtype)[relative_position_index(h)]  # (h, kh, hd)
        rw = self.rel_pos_w.get_value().astype(q.dtype)[relative_position_index(w)]  # (w, kw, hd)
        rel_h = jnp.einsum(f"{grid},ykc->bnyxk", rq, rh)  # (B', heads, h, w, kh)
        rel_w = jnp.einsum(f"{grid},xkc->bnyxk", rq, rw)  # (B', heads, h, w, kw)
        rows, heads_per_step = (chunk_plan(b, nh, h, w, self.chunk_bytes) if self.chunk_bytes > 0 else (h, nh))
        if rows < h or heads_per_step < nh:
            if not first:
                q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))
            out = _attend_chunked(q, k, v, rel_h, rel_w, rows, heads_per_step, scale=self.scale,
                                  attention=self.attention)
            first = True
        else:
            out = _rel_pos_attention(q, k, v, rel_h, rel_w, scale=self.scale, attention=self.attention,
                                     heads_first=first)
        if first:
            out = out.transpose(0, 2, 1, 3)
        return out.reshape(b, h, w, d)  # (B', T, heads, hd) -> (B', h, w, D)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def chunk_plan(batch: int, heads: int, h: int, w: int, budget_bytes: int) -> tuple[int, int]:
    """(query rows, heads) per step so that a step's float32 logits fit in ``budget_bytes``.

    Rows of the query grid are taken first (as many as fit, dividing h); if a single row of
    all heads is already over budget, the heads are split too.
    """
    per_row = batch * heads * w * h * w * 4
    if per_row <= budget_bytes:
        return max(r for r in _divisors(h) if r * per_row <= budget_bytes), heads
    per_head_row = batch * w * h * w * 4
    return 1, max([g for g in _divisors(heads) if g * per_head_row <= budget_bytes] or [1])


def _attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array, rel_w: jax.Array, rows: int,
                    heads_per_step: int, *, scale: float, attention: str) -> jax.Array:
    """``_rel_pos_attention`` (heads first) over blocks of ``rows`` query rows x ``heads_per_step`` heads (``lax.map``).

    The full (heads, T, T) logits of a 64x64 global block are 200M floats per image. Computed
    in cache-sized blocks they are written and read back from cache instead of memory and the
    program's temporary memory stays small; the arithmetic per block is the unchunked one.
    Arguments and result as ``_rel_pos_attention`` with ``heads_first=True``.
    """
    b, nh, t, hd = q.shape
    _, _, h, w, kh = rel_h.shape
    kw = rel_w.shape[-1]
    nr, ng, g = h // rows, nh // heads_per_step, heads_per_step
    # Step i covers query-row block i // ng and head group i % ng.
    qc = q.reshape(b, ng, g, nr, rows * w, hd).transpose(3, 1, 0, 2, 4, 5).reshape(nr * ng, b, g, rows * w, hd)
    rhc = rel_h.reshape(b, ng, g, nr, rows, w, kh).transpose(3, 1, 0, 2, 4, 5, 6).reshape(nr * ng, b, g, rows, w, kh)
    rwc = rel_w.reshape(b, ng, g, nr, rows, w, kw).transpose(3, 1, 0, 2, 4, 5, 6).reshape(nr * ng, b, g, rows, w, kw)
    kg = k.reshape(b, ng, g, -1, hd).transpose(1, 0, 2, 3, 4)  # (ng, B, g, Tk, hd)
    vg = v.reshape(b, ng, g, -1, hd).transpose(1, 0, 2, 3, 4)
    group = jnp.tile(jnp.arange(ng), nr)
    out = jax.lax.map(lambda a: _rel_pos_attention(a[0], kg[a[3]], vg[a[3]], a[1], a[2], scale=scale,
                                                   attention=attention, heads_first=True), (qc, rhc, rwc, group))
    out = out.reshape(nr, ng, b, g, rows * w, hd).transpose(2, 1, 3, 0, 4, 5)
    return out.reshape(b, nh, t, hd)


def _rel_pos_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array, rel_w: jax.Array, *,
                       scale: float, attention: str, heads_first: bool) -> jax.Array:
    """softmax(scale q k^T + rel_h + rel_w) v with decomposed relative positions as the bias.

    Args:
      q: (B, Tq, heads, hd) queries, or (B, heads, Tq, hd) with ``heads_first``; Tq = qh * qw
        (row-major over the query grid).
      k, v: (B, Tk, heads, hd), or (B, heads, Tk, hd) with ``heads_first``; Tk = kh * kw.
      rel_h: (B, heads, qh, qw, kh); rel_w: (B, heads, qh, qw, kw): the terms added to the
        logits of key row kh / key column kw.
      scale: head_dim^-0.5.
      attention: the implementation (``zsp_jax.models.attention``).
      heads_first: the layout of q, k, v and of the result.

    Returns:
      Like q.
    """
    b, nh, qh, qw, kh = rel_h.shape
    kw = rel_w.shape[-1]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nh, qh * qw, kh * kw)
    return dot_product_attention(q, k, v, attention=attention, scale=scale, bias=bias, heads_first=heads_first)


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: int, window: int, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs, chunk_bytes: int = 0, attention: str = "auto"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, 1e-6, **kw)
        self.attn = EncoderAttention(dim, heads, grid, window, chunk_bytes=chunk_bytes, attention=attention, **kw)
        self.norm2 = layer_norm(dim, 1e-6, **kw)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), gelu, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Neck(nnx.Module):
    """1x1 conv (no bias) -> LayerNorm2d -> 3x3 conv (no bias, pad 1) -> LayerNorm2d, NHWC."""

    def __init__(self, dim: int, out: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(dim, out, (1, 1), use_bias=False, padding="VALID", **kw)
        self.ln1 = layer_norm(out, 1e-6, **kw)
        self.conv2 = nnx.Conv(out, out, (3, 3), use_bias=False, padding=((1, 1), (1, 1)), **kw)
        self.ln2 = layer_norm(out, 1e-6, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ln2(self.conv2(self.ln1(self.conv1(x))))


class ImageEncoder(nnx.Module):
    """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, prompt_dim) embeddings."""

    def __init__(self, config: SamConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 global_attn_chunk_bytes: int = 0, attention: str = "auto"):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.patch_embed = PatchEmbed(c.patch_size, 3, c.encoder_dim, **kw)
        self.pos_embed = nnx.Param(jnp.zeros((1, c.grid_size, c.grid_size, c.encoder_dim), param_dtype))
        self.blocks = nnx.List([
            EncoderBlock(c.encoder_dim, c.encoder_heads, c.mlp_ratio, c.grid_size,
                         0 if i in c.global_attn_indexes else c.window_size,
                         chunk_bytes=global_attn_chunk_bytes if i in c.global_attn_indexes else 0,
                         attention=attention, **kw)
            for i in range(c.encoder_depth)])
        self.neck = Neck(c.encoder_dim, c.prompt_dim, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch_embed(images) + self.pos_embed.get_value().astype(self.dtype)
        for block in self.blocks:
            x = block(x)
        return self.neck(x)


def encoder_flops(config: SamConfig, batch: int = 1) -> float:
    """Analytic multiply-add FLOPs (x2) of one encoder pass, for the benchmark's FLOP/s column."""
    c = config
    g, d = c.grid_size, c.encoder_dim
    t = g * g
    flops = 2 * t * (3 * c.patch_size ** 2) * d  # patch embedding
    padded_side = math.ceil(g / c.window_size) * c.window_size
    for i in range(c.encoder_depth):
        flops += 2 * t * d * (3 * d + d + 2 * int(d * c.mlp_ratio))  # qkv, proj, mlp
        if i in c.global_attn_indexes:
            flops += 2 * 2 * t * t * d + 2 * 2 * t * g * d  # qk^T, pv, rel-pos
        else:
            win = c.window_size ** 2
            flops += (padded_side ** 2) * (2 * 2 * win * d + 2 * 2 * c.window_size * d)
    flops += 2 * t * d * c.prompt_dim + 2 * t * 9 * c.prompt_dim ** 2  # neck
    return float(flops * batch)

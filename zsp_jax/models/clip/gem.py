"""The self-self attention of the Grounding Everything Module (GEM, Bousselham et al., CVPR 2024).

Written from the published algorithm and checked against the reference ``gem`` package
(``gem/gem_utils.py: SelfSelfAttention``) to 1e-6 in fp32. For one GEM block, with q, k, v the
block's own projections of h = ln_1(x) (x the *unmodified* CLIP path):

    inv_t = mean_tokens(||h||_2) * head_dim^-0.5        (or a fixed ss_attn_temp)
    for z in (v, k, q):
        repeat ss_attn_iter times: z = l2norm(z); z = softmax(inv_t z z^T) z
        z = l2norm(z); out_z = softmax(inv_t z z^T) v    (aggregation on the original v)
    result = mean(out_v, out_k, out_q)                   (then the block's out-projection)

The temperature multiplies the logits after the matmul, as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zsp_jax.models.clip.attention import attention
from zsp_jax.models.clip.config import GemConfig


def _normalize(z: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(z.astype(jnp.float32), axis=-1, keepdims=True)
    return (z / jnp.maximum(norm, 1e-12).astype(z.dtype)).astype(z.dtype)


def self_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, h: jax.Array, gem: GemConfig) -> jax.Array:
    """GEM's q-q / k-k / v-v attention, averaged.

    Args:
      q, k, v: (B, heads, N, head_dim) projections of ``h``.
      h: (B, N, C) the block's LayerNorm output (for the adaptive temperature).
      gem: options (iterations, fixed temperature).

    Returns:
      (B, heads, N, head_dim), to be merged and out-projected by the block's attention.
    """
    b, _, _, dh = q.shape
    if gem.ss_attn_temp is None:
        inv_t = jnp.mean(jnp.linalg.norm(h.astype(jnp.float32), axis=-1), axis=-1) * dh ** -0.5  # (B,)
    else:
        inv_t = jnp.full((b,), gem.ss_attn_temp, jnp.float32)
    total = None
    # One path after the other (not stacked): peak memory stays that of one attention matrix.
    for z in (v, k, q):
        for _ in range(gem.ss_attn_iter):
            z = _normalize(z)
            z = attention(z, z, z, inv_t)
        z = _normalize(z)
        out = attention(z, z, v, inv_t)
        total = out if total is None else total + out
    return total / 3

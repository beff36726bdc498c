"""The self-self attention of the Grounding Everything Module (GEM, Bousselham et al., CVPR 2024).

Written from the published algorithm and checked against the reference ``gem`` package
(``gem/gem_utils.py: SelfSelfAttention``) to 1e-6 in fp32. For one GEM block, with q, k, v the
block's own projections of h = ln_1(x) (x the *unmodified* CLIP path):

    inv_t = mean_tokens(||h||_2) * head_dim^-0.5        (or a fixed ss_attn_temp)
    for z in (v, k, q):
        repeat ss_attn_iter times: z = l2norm(z); z = softmax(inv_t z z^T) z
        z = l2norm(z); out_z = softmax(inv_t z z^T) v    (aggregation on the original v)
    result = mean(out_v, out_k, out_q)                   (then the block's out-projection)

The temperature multiplies the logits after the matmul, as in the reference, on the einsum
path; ``jax.nn.dot_product_attention`` takes a scalar scale, so the xla / cudnn paths multiply
the per-image temperatures into the queries instead (equal to float32 rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zsp_jax.models.attention import dot_product_attention
from zsp_jax.models.clip.config import GemConfig


def _normalize(z: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(z.astype(jnp.float32), axis=-1, keepdims=True)
    return (z / jnp.maximum(norm, 1e-12).astype(z.dtype)).astype(z.dtype)


def self_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, h: jax.Array, gem: GemConfig, *,
                        attention: str = "auto", heads_first: bool = False) -> jax.Array:
    """GEM's q-q / k-k / v-v attention, averaged.

    Args:
      q, k, v: (B, N, heads, head_dim) projections of ``h``, or (B, heads, N, head_dim) with
        ``heads_first``.
      h: (B, N, C) the block's LayerNorm output (for the adaptive temperature).
      gem: options (iterations, fixed temperature).
      attention: the implementation (``zsp_jax.models.attention``).
      heads_first: the layout of q, k, v and of the result.

    Returns:
      Like q, to be merged and out-projected by the block's attention.
    """
    dh = q.shape[-1]
    if gem.ss_attn_temp is None:
        inv_t = jnp.mean(jnp.linalg.norm(h.astype(jnp.float32), axis=-1), axis=-1) * dh ** -0.5  # (B,)
    else:
        inv_t = float(gem.ss_attn_temp)
    total = None
    # One path after the other (not stacked): peak memory stays that of one attention matrix.
    for z in (v, k, q):
        for _ in range(gem.ss_attn_iter):
            z = _normalize(z)
            z = dot_product_attention(z, z, z, attention=attention, scale=inv_t, heads_first=heads_first)
        z = _normalize(z)
        out = dot_product_attention(z, z, v, attention=attention, scale=inv_t, heads_first=heads_first)
        total = out if total is None else total + out
    return total / 3

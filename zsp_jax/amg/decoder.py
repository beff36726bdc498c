"""SAM's mask decoder specialised for automatic mask generation: one point per prompt, many prompts.

The function is ``Sam.decode`` with ``multimask_output=True`` for single foreground points, computed
with the same weights (read from ``model.mask_decoder`` / ``model.prompt_encoder``) but with the
products of the attention layers **re-associated**, which the general decoder cannot do. With
T = 7 tokens per prompt (IoU token, 4 mask tokens, the point and the padding point) against
HW = 4096 image tokens of width D = 256 (internal width Di = 128, 8 heads), the general decoder
projects every prompt's 4096 image tokens through 128 x 256 matrices four times per block; here:

* token -> image attention: ``softmax(Q (K_in W_k + b_k)^T) (V_in W_v + b_v)`` is computed as
  ``softmax((Q W_k^T) K_in^T) (P V_in) W_v + b_v``: the key bias adds a constant per query row
  (softmax-invariant) and the softmax rows sum to 1, so only T x D products touch the HW axis;
* image -> token attention: ``Q_in W_q`` against T keys becomes ``Q_in (W_q K^T)`` plus the
  bias term ``b_q K^T``, and the output projection is applied to the T values first
  (``P (V W_o)``), again leaving only HW x T x D products;
* the first block's image-side projections are shared by all prompts of the image (as in
  ``Sam.decode``).

Per prompt this is about 1.7 GFLOP instead of about 3.1 GFLOP (the output upscaling, 0.8 GFLOP,
is unchanged and now dominates). The arithmetic differs from the reference only by float32
rounding (measured in tests/amg/decoder_test.py against ``Sam.decode``); it lives here, not in
the model, because it only pays off for many prompts of one image with no mask input.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from zsp_jax.amg.device import DecodeFn


def _w(module: Any) -> tuple[jax.Array, jax.Array]:
    return module.kernel.get_value(), module.bias.get_value()


def _softmax(logits: jax.Array, axis: int) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=axis)


def _token_to_image(attn: Any, q_in: jax.Array, keys: jax.Array, pos: jax.Array, dt: Any) -> jax.Array:
    """Tokens attend to per-prompt image tokens (keys ``keys + pos``, values ``keys``).

    q_in (B, N, T, D); keys (B, N, HW, D); pos (HW, D) -> (B, N, T, D). The logits are laid out
    (HW, h * T) so that both products over HW are plain matrix products per prompt, and
    ``(keys + pos) @ X`` is computed as ``keys @ X + pos @ X`` (one product for all prompts), so
    that ``keys + pos`` is never written to memory.
    """
    h = attn.heads
    wq, bq = _w(attn.q_proj)
    wk, _ = _w(attn.k_proj)  # the key bias is constant along the softmax axis
    wv, bv = _w(attn.v_proj)
    wo, bo = _w(attn.out_proj)
    di = wq.shape[1]
    dh = di // h
    t = q_in.shape[2]
    q = (q_in.astype(dt) @ wq.astype(dt) + bq.astype(dt)).reshape(q_in.shape[:-1] + (h, dh))
    qk = jnp.einsum("bntpc,dpc->bndpt", q, wk.astype(dt).reshape(-1, h, dh)).reshape(q.shape[:2] + (-1, h * t))
    logits = jnp.einsum("bnkd,bndm->bnkm", keys.astype(dt), qk) + jnp.einsum("kd,bndm->bnkm", pos, qk)
    probs = _softmax(logits / math.sqrt(dh), -2).astype(dt)  # (B, N, HW, hT)
    pv = jnp.einsum("bnkm,bnkd->bnmd", probs, keys.astype(dt)).reshape(q.shape[:2] + (h, t, -1))
    out = jnp.einsum("bnptd,dpc->bntpc", pv, wv.astype(dt).reshape(-1, h, dh)) + bv.astype(dt).reshape(h, dh)
    out = out.reshape(out.shape[:-2] + (di,))
    return out @ wo.astype(dt) + bo.astype(dt)


def _token_to_shared_image(attn: Any, q_in: jax.Array, k_in: jax.Array, v_in: jax.Array, dt: Any) -> jax.Array:
    """Tokens attend to image tokens shared by all prompts: q_in (B, N, T, D); k_in, v_in (B, HW, D)."""
    h = attn.heads
    q = attn.q_proj(q_in.astype(dt))
    k = attn.k_proj(k_in.astype(dt))
    v = attn.v_proj(v_in.astype(dt))
    dh = q.shape[-1] // h
    q = q.reshape(q.shape[:-1] + (h, dh))
    k = k.reshape(k.shape[:-1] + (h, dh))
    v = v.reshape(v.shape[:-1] + (h, dh))
    logits = jnp.einsum("bntpc,bkpc->bnptk", q, k) / math.sqrt(dh)
    probs = _softmax(logits, -1).astype(dt)
    out = jnp.einsum("bnptk,bkpc->bntpc", probs, v)
    return attn.out_proj(out.reshape(out.shape[:-2] + (h * dh,)))


def _image_to_token(attn: Any, keys: jax.Array | None, pos: jax.Array | None, q_shared: jax.Array | None,
                    k_in: jax.Array, v_in: jax.Array, dt: Any) -> jax.Array:
    """Image tokens attend to the T prompt tokens.

    Queries are either ``keys + pos`` ((B, N, HW, D) and (HW, D)) per prompt, or ``q_shared``
    (B, HW, Di) already projected and shared by all prompts. k_in, v_in (B, N, T, D).
    Returns (B, N, HW, D).

    Heads and tokens are merged into one axis of h * T columns, so that every product over the HW
    axis is a plain (HW x D) @ (D x hT) or (HW x hT) @ (hT x D) matrix product per prompt.
    """
    h = attn.heads
    wq, bq = _w(attn.q_proj)
    wo, bo = _w(attn.out_proj)
    di = wq.shape[1]
    dh = di // h
    t = k_in.shape[2]
    k = attn.k_proj(k_in.astype(dt)).reshape(k_in.shape[:-1] + (h, dh))  # (B, N, T, h, dh)
    v = attn.v_proj(v_in.astype(dt)).reshape(v_in.shape[:-1] + (h, dh))
    scale = 1.0 / math.sqrt(dh)
    if q_shared is not None:
        # Block-diagonal (Di x hT) key matrix per prompt: head p's queries only see head p's keys.
        kmat = jnp.einsum("bntpc,pr->bnpcrt", k, jnp.eye(h, dtype=dt)).reshape(k.shape[:2] + (di, h * t))
        logits = jnp.einsum("bqc,bncm->bnqm", q_shared, kmat)
    else:
        kq = jnp.einsum("dpc,bntpc->bndpt", wq.astype(dt).reshape(-1, h, dh), k).reshape(k.shape[:2] + (-1, h * t))
        bias = jnp.einsum("pc,bntpc->bnpt", bq.astype(dt).reshape(h, dh), k).reshape(k.shape[:2] + (1, h * t))
        logits = (jnp.einsum("bnqd,bndm->bnqm", keys.astype(dt), kq) + jnp.einsum("qd,bndm->bnqm", pos, kq)
                  + bias)
    logits = (logits * scale).reshape(logits.shape[:-1] + (h, t))
    probs = _softmax(logits, -1).astype(dt).reshape(logits.shape[:-2] + (h * t,))  # (B, N, HW, hT)
    vo = jnp.einsum("bntpc,pco->bnpto", v, wo.astype(dt).reshape(h, dh, -1)).reshape(v.shape[:2] + (h * t, -1))
    return jnp.einsum("bnqm,bnmo->bnqo", probs, vo) + bo.astype(dt)


def point_decoder(model: Any, *, group: int = 4, upscale_rows: int = 8) -> DecodeFn:
    """A ``DecodeFn`` for ``zsp_jax.amg.device``: single foreground points, three masks each.

    Args:
      model: a ``zsp_jax.models.sam.Sam``.
      group: prompts decoded together; the N prompts of a call are decoded ``group`` at a time
        (``lax.map``). Small groups keep each prompt's (HW, D) image tokens in cache between the
        layers: on the 2-core CPU, 4 prompts per group ran about 25% faster than 64.
      upscale_rows: the output upscaling runs on slabs of this many grid rows (cache-sized
        intermediates, about 15% faster on CPU than the whole grid at once).

    Returns:
      decode(embeddings (B, g, g, D), points (B, N, 2) xy in the resized-input frame) ->
      (low-res logits (B, N, 3, 4g, 4g) float32, predicted IoUs (B, N, 3) float32).
    """
    md = model.mask_decoder
    pe = model.prompt_encoder
    cfg = md.config
    if cfg.num_multimask_outputs != 3 or cfg.decoder_depth < 1:
        raise ValueError("point_decoder supports SAM's decoder layout (3 multimask outputs, depth >= 1)")
    dt = md.dtype

    def decode(embeddings: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
        n = points.shape[1]
        if n <= group or n % group:
            return decode_group(embeddings, points)
        chunks = points.reshape(points.shape[0], n // group, group, 2).transpose(1, 0, 2, 3)
        masks, iou = jax.lax.map(lambda p: decode_group(embeddings, p), chunks)
        masks = jnp.moveaxis(masks, 0, 1).reshape((points.shape[0], n) + masks.shape[3:])
        iou = jnp.moveaxis(iou, 0, 1).reshape(points.shape[0], n, -1)
        return masks, iou

    def upscale(keys: jax.Array, hyper: jax.Array) -> jax.Array:
        b, n, g, gw, d = keys.shape
        rows = upscale_rows if g % upscale_rows == 0 else g
        slabs = jnp.moveaxis(keys.reshape(b, n, g // rows, rows, gw, d), 2, 0)
        out = jax.lax.map(lambda k: md.output_upscaling.mask_logits(k, hyper), slabs)  # (g/r, B, N, 3, 4r, 4gw)
        out = jnp.moveaxis(out, 0, 3)
        return out.reshape(b, n, out.shape[2], 4 * g, 4 * gw)

    def decode_group(embeddings: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, g, _, d = embeddings.shape
        n = points.shape[1]
        labels = jnp.ones(points.shape[:2] + (1,), jnp.int32)
        sparse = pe.embed_points(points[:, :, None, :], labels, pad=True)  # (B, N, 2, D)
        out_tokens = jnp.concatenate([md.iou_token.embedding.get_value(), md.mask_tokens.embedding.get_value()])
        out_tokens = jnp.broadcast_to(out_tokens.astype(jnp.float32), (b, n) + out_tokens.shape)
        tokens = jnp.concatenate([out_tokens, sparse.astype(jnp.float32)], axis=2).astype(dt)  # (B, N, T, D)
        no_mask = pe.no_mask_embed.embedding.get_value()[0]
        src = (embeddings.astype(dt) + no_mask.astype(dt)).reshape(b, g * g, d)  # shared by the prompts
        pos = model.dense_pe().astype(dt).reshape(g * g, d)

        layers = md.transformer.layers
        # Block 0 (no positional encoding in its self-attention; image side shared).
        l0 = layers[0]
        q = l0.norm1(l0.self_attn(tokens, tokens, tokens))
        q = l0.norm2(q + _token_to_shared_image(l0.cross_attn_token_to_image, q + tokens, src + pos, src, dt))
        q = l0.norm3(q + l0.mlp(q))
        q_shared = l0.cross_attn_image_to_token.q_proj(src + pos)
        keys = l0.norm4(src[:, None] + _image_to_token(l0.cross_attn_image_to_token, None, None, q_shared,
                                                          q + tokens, q, dt))
        # Later blocks: image tokens differ per prompt.
        for layer in list(layers)[1:]:
            qp = q + tokens
            q = layer.norm1(q + layer.self_attn(qp, qp, q))
            q = layer.norm2(q + _token_to_image(layer.cross_attn_token_to_image, q + tokens, keys, pos, dt))
            q = layer.norm3(q + layer.mlp(q))
            keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, keys, pos, None, q + tokens,
                                                      q, dt))
        attn = _token_to_image(md.transformer.final_attn_token_to_image, q + tokens, keys, pos, dt)
        hs = md.transformer.norm_final_attn(q + attn)

        hyper = jnp.stack([md.output_hypernetworks_mlps[i](hs[:, :, 1 + i]) for i in range(1, 4)], axis=2)
        masks = upscale(keys.reshape(b, n, g, g, d), hyper)
        iou = md.iou_prediction_head(hs[:, :, 0])[..., 1:]
        return masks.astype(jnp.float32), iou.astype(jnp.float32)

    return decode

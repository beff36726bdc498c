"""SAM's mask decoder specialised for automatic mask generation: one point per prompt, many prompts.

``point_decoder`` computes ``Sam.decode`` with ``multimask_output=True`` for single foreground
points, with the same weights (read from ``model.mask_decoder`` / ``model.prompt_encoder``) but with
the products of the attention layers **re-associated**, which the general decoder cannot do. With
T = 7 tokens per prompt (IoU token, 4 mask tokens, the point and the padding point) against
HW = 4096 image tokens of width D = 256 (internal width Di = 128, 8 heads), the general decoder
projects every prompt's 4096 image tokens through 128 x 256 matrices four times per block; here:

* token -> image attention: ``softmax(Q (K_in W_k + b_k)^T) (V_in W_v + b_v)`` is computed as
  ``softmax((Q W_k^T) K_in^T) (P V_in) W_v + b_v``: the key bias adds a constant per query row
  (softmax-invariant) and the softmax rows sum to 1, so only T x D products touch the HW axis;
* image -> token attention: ``Q_in W_q`` against T keys becomes ``Q_in (W_q K^T)`` plus the
  bias term ``b_q K^T``, and the output projection is applied to the T values first
  (``P (V W_o)``), again leaving only HW x T x D products;
* the image tokens plus their positional encoding, ``keys + pos``, are formed once per prompt
  and block and feed both attentions' HW x D x hT products (one product each, not one for the
  keys and one for ``pos``);
* everything that depends on the image alone (the first block's image-side projections, the
  positional encoding) is computed once per image (``image_context``), not once per prompt group;
* the output upscaling (0.8 GFLOP per prompt, the largest single cost) runs one prompt at a time
  right after its group's transformer, and with ``iou_threshold`` only for the prompts that have a
  mask whose predicted IoU passes the generator's filter: the IoU head needs only the transformer,
  and a filtered candidate's logits are never read;
* the final token -> image attention only for the tokens read afterwards (the IoU token and the
  three multimask tokens).

The arithmetic differs from the reference only by float32 rounding (measured in
tests/amg/decoder_test.py against ``Sam.decode``); it lives here, not in the model, because it
only pays off for many prompts of one image with no mask input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zsp_jax.models.sam.layers import gelu

# Tokens of the decoder: IoU, 4 mask tokens (the first is the single-mask output), point, padding point.
USED_TOKENS = (0, 2, 3, 4)  # what multimask output reads: the IoU token and mask tokens 1..3


class PromptDecoder(NamedTuple):
    """How ``generate_padded`` decodes single foreground points (three masks per point).

    Attributes:
      image_context: embeddings (B, g, g, D) -> a pytree of what the decoder needs from the
        image; computed once per crop and passed to every ``decode`` call.
      decode: (context, points (B, N, 2) xy in the resized-input frame, iou_threshold: float or
        None) -> (low-res logits (B, N, 3, 4g, 4g) float32, predicted IoUs (B, N, 3) float32).
        With a threshold, the logits of a prompt whose three IoUs are all <= it may be left at 0
        (the generator's predicted-IoU filter drops them unread).
    """

    image_context: Callable[[jax.Array], Any]
    decode: Callable[[Any, jax.Array, float | None], tuple[jax.Array, jax.Array]]


def model_decoder(model: Any) -> PromptDecoder:
    """``Sam.decode`` with one foreground point per prompt, three masks per point (no shortcuts)."""

    def decode(embeddings: jax.Array, points: jax.Array, iou_threshold: float | None = None
               ) -> tuple[jax.Array, jax.Array]:
        del iou_threshold  # every mask is computed
        labels = jnp.ones(points.shape[:2] + (1,), jnp.int32)
        return model.decode(embeddings, points[:, :, None, :], labels, multimask_output=True)

    return PromptDecoder(lambda embeddings: embeddings, decode)


def _w(module: Any) -> tuple[jax.Array, jax.Array]:
    return module.kernel.get_value(), module.bias.get_value()


def _softmax(logits: jax.Array, axis: int) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=axis)


def _token_to_image(attn: Any, q_in: jax.Array, keys_pos: jax.Array, keys: jax.Array, dt: Any) -> jax.Array:
    """Tokens attend to per-prompt image tokens (attention keys ``keys_pos``, values ``keys``).

    q_in (B, N, T, D); keys_pos = keys + pos and keys (B, N, HW, D) -> (B, N, T, D). The logits
    are laid out (HW, h * T) so that both products over HW are plain matrix products per prompt.
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
    logits = jnp.einsum("bnkd,bndm->bnkm", keys_pos, qk)
    probs = _softmax(logits / math.sqrt(dh), -2).astype(dt)  # (B, N, HW, hT)
    pv = jnp.einsum("bnkm,bnkd->bnmd", probs, keys).reshape(q.shape[:2] + (h, t, -1))
    out = jnp.einsum("bnptd,dpc->bntpc", pv, wv.astype(dt).reshape(-1, h, dh)) + bv.astype(dt).reshape(h, dh)
    out = out.reshape(out.shape[:-2] + (di,))
    return out @ wo.astype(dt) + bo.astype(dt)


def _shared_keys_values(attn: Any, k_in: jax.Array, v_in: jax.Array, dt: Any) -> tuple[jax.Array, jax.Array]:
    """Projected keys and values of image tokens shared by all prompts: (B, HW, D) -> 2 x (B, HW, h, dh)."""
    h = attn.heads
    k = attn.k_proj(k_in.astype(dt))
    v = attn.v_proj(v_in.astype(dt))
    return k.reshape(k.shape[:-1] + (h, -1)), v.reshape(v.shape[:-1] + (h, -1))


def _token_to_shared_image(attn: Any, q_in: jax.Array, k: jax.Array, v: jax.Array, dt: Any) -> jax.Array:
    """Tokens attend to projected image tokens shared by all prompts: q_in (B, N, T, D); k, v (B, HW, h, dh)."""
    h = attn.heads
    q = attn.q_proj(q_in.astype(dt))
    dh = q.shape[-1] // h
    q = q.reshape(q.shape[:-1] + (h, dh))
    logits = jnp.einsum("bntpc,bkpc->bnptk", q, k) / math.sqrt(dh)
    probs = _softmax(logits, -1).astype(dt)
    out = jnp.einsum("bnptk,bkpc->bntpc", probs, v)
    return attn.out_proj(out.reshape(out.shape[:-2] + (h * dh,)))


def _image_to_token(attn: Any, keys_pos: jax.Array | None, q_shared: jax.Array | None, k_in: jax.Array,
                    v_in: jax.Array, dt: Any) -> jax.Array:
    """Image tokens attend to the T prompt tokens.

    Queries are either ``keys_pos`` = keys + pos (B, N, HW, D) per prompt, or ``q_shared``
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
        logits = jnp.einsum("bnqd,bndm->bnqm", keys_pos, kq) + bias
    logits = (logits * scale).reshape(logits.shape[:-1] + (h, t))
    probs = _softmax(logits, -1).astype(dt).reshape(logits.shape[:-2] + (h * t,))  # (B, N, HW, hT)
    vo = jnp.einsum("bntpc,pco->bnpto", v, wo.astype(dt).reshape(h, dh, -1)).reshape(v.shape[:2] + (h * t, -1))
    return jnp.einsum("bnqm,bnmo->bnqo", probs, vo) + bo.astype(dt)


def _mask_logits(upscaling: Any, x: jax.Array, hyper: jax.Array) -> jax.Array:
    """SAM's output upscaling and hypernetwork product, ``OutputUpscaling.mask_logits`` with the product laid out
    pixels x channels.

    Both transposed convolutions, the LayerNorm and the GELUs act on each embedding cell on its own,
    so the 4 x 4 pixels a cell paints stay trailing axes (a, d) x (b, e) of that cell; the last
    product contracts the 32 channels of every pixel with the 3 hypernetwork vectors as a
    (pixels x 32) @ (32 x 3) product, and only its 3 outputs per pixel are moved into image layout
    (output row 4h + 2a + d, column 4w + 2b + e), not the 32 channels.

    Args:
      x: (B, N, g, g', D) image tokens (g' columns of a slab of g rows).
      hyper: (B, N, K, D/8) hypernetwork outputs.

    Returns:
      (B, N, K, 4g, 4g') mask logits.
    """
    dt = upscaling.conv1.dtype
    k1, b1 = upscaling.conv1.kernel.get_value().astype(dt), upscaling.conv1.bias.get_value().astype(dt)
    k2, b2 = upscaling.conv2.kernel.get_value().astype(dt), upscaling.conv2.bias.get_value().astype(dt)
    # z: image, n: prompt, (h, w): embedding cell, (a, b) and (d, e): sub-pixel offsets.
    y = jnp.einsum("znhwc,abco->znhwabo", x.astype(dt), k1) + b1
    y = gelu(upscaling.ln(y))
    y = gelu(jnp.einsum("znhwabc,deco->znhwabdeo", y, k2) + b2)
    m = jnp.einsum("znhwabdeo,znko->znhwabdek", y, hyper.astype(dt))
    z, n, g, w = m.shape[:4]
    return jnp.moveaxis(m, -1, 2).transpose(0, 1, 2, 3, 5, 7, 4, 6, 8).reshape(z, n, -1, 4 * g, 4 * w)


def point_decoder(model: Any, *, group: int = 4, upscale_rows: int = 16) -> PromptDecoder:
    """The ``PromptDecoder`` of ``model`` for ``zsp_jax.amg.generate``: single foreground points, three masks each.

    Args:
      model: a ``zsp_jax.models.sam.Sam``.
      group: prompts decoded together; the N prompts of a call are decoded ``group`` at a time
        (``lax.map``). Small groups keep each prompt's (HW, D) image tokens in cache between the
        layers (the CPU's choice, ``zsp_jax.amg.tuning``); accelerators prefer wide groups.
      upscale_rows: the output upscaling runs on slabs of this many grid rows (cache-sized
        intermediates on the CPU).

    Returns:
      A ``PromptDecoder``; ``decode`` returns low-res logits (B, N, 3, 4g, 4g) float32 and
      predicted IoUs (B, N, 3) float32.
    """
    md = model.mask_decoder
    pe = model.prompt_encoder
    cfg = md.config
    if cfg.num_multimask_outputs != 3 or cfg.decoder_depth < 1:
        raise ValueError("point_decoder supports SAM's decoder layout (3 multimask outputs, depth >= 1)")
    dt = md.dtype
    layers = list(md.transformer.layers)

    def image_context(embeddings: jax.Array) -> dict[str, jax.Array]:
        """Everything the prompts of an image share: its tokens and the first block's image side."""
        b, g, _, d = embeddings.shape
        no_mask = pe.no_mask_embed.embedding.get_value()[0]
        src = (embeddings.astype(dt) + no_mask.astype(dt)).reshape(b, g * g, d)
        pos = model.dense_pe().astype(dt).reshape(g * g, d)
        first = layers[0]
        k0, v0 = _shared_keys_values(first.cross_attn_token_to_image, src + pos, src, dt)
        q0 = first.cross_attn_image_to_token.q_proj(src + pos)
        return {"src": src, "pos": pos, "k0": k0, "v0": v0, "q0": q0}

    def transformer(ctx: dict[str, jax.Array], points: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """N prompts -> (image tokens (B, N, HW, D), hypernetwork outputs (B, N, 3, D/8), IoUs (B, N, 3))."""
        b = points.shape[0]
        src, pos = ctx["src"], ctx["pos"]
        labels = jnp.ones(points.shape[:2] + (1,), jnp.int32)
        sparse = pe.embed_points(points[:, :, None, :], labels, pad=True)  # (B, N, 2, D)
        out_tokens = jnp.concatenate([md.iou_token.embedding.get_value(), md.mask_tokens.embedding.get_value()])
        out_tokens = jnp.broadcast_to(out_tokens.astype(jnp.float32), (b, points.shape[1]) + out_tokens.shape)
        tokens = jnp.concatenate([out_tokens, sparse.astype(jnp.float32)], axis=2).astype(dt)  # (B, N, T, D)
        # Block 0 (no positional encoding in its self-attention; image side shared).
        l0 = layers[0]
        q = l0.norm1(l0.self_attn(tokens, tokens, tokens))
        q = l0.norm2(q + _token_to_shared_image(l0.cross_attn_token_to_image, q + tokens, ctx["k0"], ctx["v0"], dt))
        q = l0.norm3(q + l0.mlp(q))
        keys = l0.norm4(src[:, None] + _image_to_token(l0.cross_attn_image_to_token, None, ctx["q0"], q + tokens,
                                                          q, dt))
        # Later blocks: image tokens differ per prompt.
        for layer in layers[1:]:
            keys_pos = keys + pos
            qp = q + tokens
            q = layer.norm1(q + layer.self_attn(qp, qp, q))
            q = layer.norm2(q + _token_to_image(layer.cross_attn_token_to_image, q + tokens, keys_pos, keys, dt))
            q = layer.norm3(q + layer.mlp(q))
            keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, keys_pos, None, q + tokens,
                                                      q, dt))
        # The final attention only for the tokens read afterwards: the IoU token and the three multimask
        # tokens (each token's row is computed on its own, so the others can be left out).
        used = jnp.asarray(USED_TOKENS)
        q, tokens = q[:, :, used], tokens[:, :, used]
        attn = _token_to_image(md.transformer.final_attn_token_to_image, q + tokens, keys + pos, keys, dt)
        hs = md.transformer.norm_final_attn(q + attn)
        hyper = jnp.stack([md.output_hypernetworks_mlps[i](hs[:, :, i]) for i in range(1, 4)], axis=2)
        iou = md.iou_prediction_head(hs[:, :, 0])[..., 1:]
        return keys, hyper, iou.astype(jnp.float32)

    def upscale(keys: jax.Array, hyper: jax.Array) -> jax.Array:
        """(B, N, HW, D) image tokens, (B, N, 3, D/8) -> (B, N, 3, 4g, 4g) float32 mask logits."""
        b, n, hw, d = keys.shape
        g = math.isqrt(hw)
        rows = upscale_rows if g % upscale_rows == 0 else g
        slabs = jnp.moveaxis(keys.reshape(b, n, g // rows, rows, g, d), 2, 0)
        out = jax.lax.map(lambda k: _mask_logits(md.output_upscaling, k, hyper), slabs)  # (g/r, B, N, 3, 4r, 4g)
        out = jnp.moveaxis(out, 0, 3)
        return out.reshape(b, n, out.shape[2], 4 * g, 4 * g).astype(jnp.float32)

    def decode(ctx: dict[str, jax.Array], points: jax.Array, iou_threshold: float | None = None
               ) -> tuple[jax.Array, jax.Array]:
        b, n = points.shape[:2]
        size = group if n > group and n % group == 0 else n

        def one_group(p):
            keys, hyper, iou = transformer(ctx, p)
            # The output upscaling one prompt at a time, right after the group's transformer, so that the
            # prompt's image tokens and the upscaling's intermediates are still in cache. With a threshold, a
            # prompt none of whose masks passes the predicted-IoU filter (in any image of the group) is not
            # upscaled at all; skipping a whole prompt keeps that locality, where gathering the wanted prompts
            # of a point batch first would write and re-read every prompt's image tokens.
            wanted = (jnp.ones(p.shape[1], bool) if iou_threshold is None
                      else jnp.any(jnp.any(iou > iou_threshold, axis=-1), axis=0))  # (size,)

            def one_prompt(xs):
                k, h, w = xs  # (B, HW, D), (B, 3, D/8), ()
                if iou_threshold is None:
                    return upscale(k[:, None], h[:, None])[:, 0]
                return jax.lax.cond(w, lambda: upscale(k[:, None], h[:, None])[:, 0],
                                    lambda: jnp.zeros((b, 3) + (4 * math.isqrt(k.shape[1]),) * 2, jnp.float32))

            masks = jax.lax.map(one_prompt, (jnp.moveaxis(keys, 1, 0), jnp.moveaxis(hyper, 1, 0), wanted))
            return jnp.moveaxis(masks, 0, 1), iou

        masks, iou = jax.lax.map(one_group, points.reshape(b, n // size, size, 2).transpose(1, 0, 2, 3))
        masks = jnp.moveaxis(masks, 0, 1).reshape((b, n) + masks.shape[3:])
        return masks, jnp.moveaxis(iou, 0, 1).reshape(b, n, -1)

    return PromptDecoder(image_context, decode)


def decode_flops_per_prompt(model: Any, *, group: int = 4) -> float | None:
    """FLOPs of decoding one prompt with ``point_decoder`` (every mask upscaled; the per-image context excluded),
    from XLA's cost analysis of a group of ``group`` prompts; None where the backend gives no count."""
    from flax import nnx

    from zsp_jax.utils import bench

    graphdef, state = nnx.split(model)
    g, d = model.config.grid_size, model.config.prompt_dim
    # One slab of rows: XLA counts a lax.map body once.
    make = lambda st: point_decoder(nnx.merge(graphdef, st), group=group, upscale_rows=g)  # noqa: E731
    embeddings = jax.ShapeDtypeStruct((1, g, g, d), jnp.float32)
    context = jax.eval_shape(lambda st, e: make(st).image_context(e), state, embeddings)
    flops = bench.compiled_flops(jax.jit(lambda st, c, p: make(st).decode(c, p)), state, context,
                                 jax.ShapeDtypeStruct((1, group, 2), jnp.float32))
    return None if flops is None else flops / group

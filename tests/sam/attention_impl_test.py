"""SAM's attention through ``jax.nn.dot_product_attention`` (attention="xla") against the einsum path and the reference.

Both implementations run on the tiny randomised pair of conftest.py (relative-position tables
random, so the bias matters), fp32. The xla path must equal the einsum path to float32 rounding
(<= 1e-5 relative; measured ~2e-7 to 1e-6) and segment-anything within the parity bound (1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.models.sam import Sam
from zsp_jax.models.sam.image_encoder import EncoderBlock
from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error

TOL_REF = 1e-4
TOL_IMPL = 1e-5


def _block(config, source, window: int, attention: str, chunk_bytes: int = 0) -> EncoderBlock:
    block = EncoderBlock(config.encoder_dim, config.encoder_heads, config.mlp_ratio, config.grid_size, window,
                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), chunk_bytes=chunk_bytes,
                         attention=attention)
    nnx.update(block, nnx.state(source))
    return block


@pytest.fixture(scope="module")
def tokens(tiny_config):
    g, d = tiny_config.grid_size, tiny_config.encoder_dim
    return np.random.default_rng(7).normal(size=(2, g, g, d)).astype(np.float32)


@pytest.mark.parametrize("index,budget", [(0, 0), (1, 0), (1, 2**15)], ids=["windowed", "global", "global-chunked"])
def test_encoder_block_xla_equals_einsum_and_reference(tiny_config, tiny_pair, tokens, index, budget):
    """Windowed (padded 16 -> 18 grid) and global blocks with the relative-position bias."""
    ref, ours = tiny_pair
    source = ours.image_encoder.blocks[index]
    assert float(jnp.abs(source.attn.rel_pos_h.get_value()).max()) > 0  # the bias is not zero
    window = 0 if index in tiny_config.global_attn_indexes else tiny_config.window_size
    assert (window == 0) == (index == 1)
    x = jnp.asarray(tokens)
    got = {impl: jax.jit(lambda m, x: m(x))(_block(tiny_config, source, window, impl, budget), x)
           for impl in ("xla", "einsum")}
    with torch.no_grad():
        want = ref.image_encoder.blocks[index](torch.from_numpy(tokens)).numpy()
    assert relative_error(got["xla"], got["einsum"]) <= TOL_IMPL
    assert relative_error(got["xla"], want) <= TOL_REF


def _sam(config, source: Sam, attention: str) -> Sam:
    """``source``'s weights in a ``Sam`` built with ``attention``."""
    model = Sam(config, rngs=nnx.Rngs(0), attention=attention)
    nnx.update(model, nnx.state(source))
    return model


@pytest.fixture(scope="module")
def xla_sam(tiny_config, tiny_pair):
    return _sam(tiny_config, tiny_pair[1], "xla")


def test_image_encoder_xla(tiny_config, tiny_pair, xla_sam):
    ref, ours = tiny_pair
    s = tiny_config.image_size
    x = np.random.default_rng(8).normal(size=(1, s, s, 3)).astype(np.float32)
    embed = jax.jit(lambda m, x: m.embed(x))
    got, einsum = embed(xla_sam, jnp.asarray(x)), embed(_sam(tiny_config, ours, "einsum"), jnp.asarray(x))
    with torch.no_grad():
        want = ref.image_encoder(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    assert relative_error(got, einsum) <= TOL_IMPL
    assert relative_error(got, want) <= TOL_REF


@pytest.mark.parametrize("kind", ["points", "points+masks"], ids=["shared-image-keys", "per-prompt-image"])
def test_mask_decoder_xla_equals_einsum_and_reference(tiny_config, tiny_pair, xla_sam, kind):
    """Without mask inputs the first block's image side is shared by the prompts (queries laid end to end,
    and the image->token queries broadcast); with mask inputs every prompt has its own image tokens."""
    ref, ours = tiny_pair
    b, n, p = 2, 3, 2
    g = tiny_config.grid_size
    rng = np.random.default_rng(9)
    emb = rng.normal(size=(b, g, g, 256)).astype(np.float32)
    coords, labels, _, masks = sam_refs.random_prompts(rng, b, n, p, tiny_config.image_size)
    use_m = "masks" in kind
    decode = jax.jit(lambda m, e, c, lab, mk: m.decode(e, c, lab, None, mk, multimask_output=True))
    args = (jnp.asarray(emb), jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(masks) if use_m else None)
    low, iou = decode(xla_sam, *args)
    low_e, iou_e = decode(_sam(tiny_config, ours, "einsum"), *args)
    assert relative_error(low, low_e) <= TOL_IMPL and relative_error(iou, iou_e) <= TOL_IMPL
    for i in range(b):
        want_low, want_iou = sam_refs.reference_decode(
            ref, torch.from_numpy(emb[i:i + 1].transpose(0, 3, 1, 2).copy()), torch.from_numpy(coords[i]),
            torch.from_numpy(labels[i]), None,
            torch.from_numpy(masks[i].transpose(0, 3, 1, 2).copy()) if use_m else None, multimask_output=True)
        assert relative_error(low[i], want_low) <= TOL_REF
        assert relative_error(iou[i], want_iou) <= TOL_REF


def test_invalid_attention_names_the_option(tiny_config):
    with pytest.raises(ValueError, match="attention='flash'"):
        Sam(tiny_config, rngs=nnx.Rngs(0), attention="flash")

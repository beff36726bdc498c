"""CLIP and GEM attention through ``jax.nn.dot_product_attention`` (attention="xla") against the einsum path
and the reference (open_clip / gem), fp32, on the tiny randomised open_clip model.

The xla path must equal the einsum path to float32 rounding (<= 1e-5 relative) and the
reference within the parity bound (1e-4).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zsp_jax.models.clip import ClipConfig, ClipModel, GemConfig, dense_features_fn, encode_image_fn, encode_text_fn
from zsp_jax.references import clip as clip_refs
from zsp_jax.utils.bench import relative_error

TOL_REF = 1e-4
TOL_IMPL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_open_clip):
    """{"xla": ..., "einsum": ...}: the tiny converted open_clip model built with each implementation."""
    _, converted = tiny_open_clip
    return {impl: converted.build(attention=impl) for impl in ("xla", "einsum")}


def test_text_tower_causal_mask(tiny_open_clip, models):
    """Causal blocks (is_causal) and the last block's end-of-text query (an explicit (B, 1, 1, S) mask)."""
    torch_model, _ = tiny_open_clip
    rng = np.random.default_rng(5)
    ids = np.zeros((3, 77), np.int64)
    for row, length in enumerate((5, 12, 30)):  # end-of-text at different positions
        ids[row, 0] = 49406
        ids[row, 1:length - 1] = rng.integers(300, 40000, size=length - 2)
        ids[row, length - 1] = 49407
    got = {impl: encode_text_fn(m)(ids) for impl, m in models.items()}
    with torch.no_grad():
        want = torch_model.encode_text(torch.from_numpy(ids)).numpy()
    assert relative_error(got["xla"], got["einsum"]) <= TOL_IMPL
    assert relative_error(got["xla"], want) <= TOL_REF


def test_image_tower(tiny_open_clip, models):
    torch_model, _ = tiny_open_clip
    images = clip_refs.random_images(2, 32, 32, seed=6)  # the training size: open_clip keeps its embedding
    got = {impl: encode_image_fn(m)(images) for impl, m in models.items()}
    with torch.no_grad():
        want = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert relative_error(got["xla"], got["einsum"]) <= TOL_IMPL
    assert relative_error(got["xla"], want) <= TOL_REF


def test_gem_self_self_attention_per_example_temperature():
    """GEM's adaptive inverse temperature is a (B,) scale (folded into the queries on the xla path)."""
    from zsp_jax.models.clip.gem import self_self_attention

    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 10, 2, 8)), jnp.float32) for _ in range(3))
    h = rng.normal(size=(2, 10, 16)).astype(np.float32)
    h[1] *= 3.0  # image 1: three times the temperature of image 0
    out = {impl: self_self_attention(q, k, v, jnp.asarray(h), GemConfig(ss_attn_iter=2), attention=impl)
           for impl in ("xla", "einsum")}
    assert relative_error(out["xla"], out["einsum"]) <= TOL_IMPL
    # The temperature matters: image 1 with image 0's temperature gives another result.
    h_same = h.copy()
    h_same[1] /= 3.0
    other = self_self_attention(q, k, v, jnp.asarray(h_same), GemConfig(ss_attn_iter=2), attention="xla")
    assert relative_error(other[0], out["xla"][0]) <= TOL_IMPL
    assert relative_error(other[1], out["xla"][1]) > 1e-3


@pytest.mark.parametrize("gem_cfg", [GemConfig(depth=3, ss_attn_iter=2), GemConfig(depth=3, ss_attn_temp=0.7)],
                         ids=["adaptive-temperature", "fixed-temperature"])
def test_gem_dense_features(tiny_open_clip, models, gem_cfg):
    """Dense features of two images of different contrast (different adaptive temperatures)."""
    torch_model, _ = tiny_open_clip
    images = clip_refs.random_images(2, 48, 40, seed=7)
    images[1] *= 3.0
    got = {impl: dense_features_fn(m, gem_cfg, return_original=True)(images) for impl, m in models.items()}
    wrapper = clip_refs.gem_reference(torch_model, depth=gem_cfg.depth, ss_attn_iter=gem_cfg.ss_attn_iter,
                                      ss_attn_temp=gem_cfg.ss_attn_temp)
    feat_gem, feat_ori = clip_refs.gem_reference_features(wrapper, images)
    xla, einsum = got["xla"], got["einsum"]
    b, gh, gw, d = xla.tokens.shape
    assert relative_error(xla.tokens, einsum.tokens) <= TOL_IMPL
    assert relative_error(xla.original_tokens, einsum.original_tokens) <= TOL_IMPL
    assert relative_error(np.asarray(xla.tokens).reshape(b, gh * gw, d), feat_gem[:, 1:]) <= TOL_REF
    assert relative_error(np.asarray(xla.original_tokens).reshape(b, gh * gw, d), feat_ori[:, 1:]) <= TOL_REF
    assert relative_error(xla.image_embeds, feat_ori[:, 0]) <= TOL_REF


def test_invalid_attention_names_the_option():
    with pytest.raises(ValueError, match="attention='fused'"):
        ClipModel(ClipConfig.tiny(), attention="fused")

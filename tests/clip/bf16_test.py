"""bfloat16 compute: the deviation from fp32 stays within the bounds stated in docs/models.md.

The figures in docs/benchmarks.md (ViT-B/16 + GEM at 448) come from ``tools/bench_clip.py --bf16``;
here the same measures run on the tiny model with bounds that a broken bf16 path would exceed.
"""

import jax.numpy as jnp
import numpy as np

from zsp_jax.models.clip import GemConfig, build_clip, dense_features_fn, encode_text_fn
from zsp_jax.references import clip as clip_refs
from zsp_jax.utils.bench import relative_error


def _cosine(a, b):
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_bf16_close_to_fp32(tiny_open_clip, tokenizer):
    _, converted = tiny_open_clip
    f32 = converted.build()
    b16 = build_clip(converted.config, converted.weights, source_name="tiny", dtype=jnp.bfloat16)
    assert b16.visual.blocks[0].attn.q.kernel.get_value().dtype == jnp.bfloat16
    images = clip_refs.random_images(2, 64, 64, seed=5)
    a = dense_features_fn(f32, GemConfig(depth=3))(images)
    b = dense_features_fn(b16, GemConfig(depth=3))(images)
    assert b.tokens.dtype == jnp.bfloat16
    assert _cosine(b.tokens, a.tokens).min() > 0.99
    assert relative_error(b.tokens.astype(jnp.float32), a.tokens) < 0.1
    assert _cosine(b.image_embeds, a.image_embeds).min() > 0.99
    ids = tokenizer([f"a photo of a {c}." for c in clip_refs.VOC_CLASSES])
    ta, tb = encode_text_fn(f32)(ids), encode_text_fn(b16)(ids)
    assert _cosine(tb, ta).min() > 0.99
    # and the decision the labeller makes (best class per token) mostly agrees
    t = np.asarray(ta) / np.linalg.norm(ta, axis=-1, keepdims=True)
    agree = np.mean(np.argmax(np.asarray(a.tokens) @ t.T, -1) == np.argmax(np.asarray(b.tokens, np.float32) @ t.T, -1))
    assert agree > 0.8

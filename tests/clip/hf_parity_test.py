"""ClipModel against transformers' CLIPModel with random weights (every tensor randomised)."""

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.models.clip import build_clip, convert_state_dict, encode_image_fn, encode_text_fn
from zsp_jax.references import clip as clip_refs
from zsp_jax.utils.bench import relative_error

PROMPTS = ["a photo of a cat.", "a photo of a potted plant.", "tv monitor", "a jpeg corrupted photo of the dog."]


def _reference(model, images_nhwc, ids, **kw):
    pixels = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels, **kw).pooler_output.numpy()
        txt = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
        logits = model(input_ids=torch.from_numpy(ids).long(), pixel_values=pixels, **kw).logits_per_image.numpy()
    return img, txt, logits


def _ours(model, images, ids):
    """(image embeddings, text embeddings, logits) of our model, jitted (faster than eager here)."""
    img = encode_image_fn(model)(images) if images is not None else None
    txt = encode_text_fn(model)(ids) if ids is not None else None
    logits = None
    if images is not None and ids is not None:
        logits = nnx.jit(lambda m, x, t: m.logits(x, t))(model, images, ids)
    return img, txt, logits


def _assert_embeddings_and_logits_match(ours, model, images, ids):
    """Image and text embeddings within 1e-5, logits within 1e-4 of transformers'; returns its text embeddings."""
    img, txt, logits = _reference(model, images, ids)
    o_img, o_txt, o_logits = _ours(ours, images, ids)
    assert relative_error(o_img, img) <= 1e-5
    assert relative_error(o_txt, txt) <= 1e-5
    assert relative_error(o_logits, logits) <= 1e-4
    return txt


def _hf_ids(tokenizer, prompts):
    """transformers' layout: padded with end-of-text (49407), not 0."""
    ids = tokenizer(prompts)
    return np.where(ids == 0, tokenizer.eot_id, ids)


def test_tiny_embeddings_and_logits(tiny_hf, tokenizer):
    model, _, converted = tiny_hf
    ours = converted.build()
    images = clip_refs.random_images(3, 32, 32)
    ids = _hf_ids(tokenizer, PROMPTS)
    txt = _assert_embeddings_and_logits_match(ours, model, images, ids)
    # zero padding (OpenAI / open_clip layout) and cutting the context give the same text embeddings
    zero_padded = tokenizer(PROMPTS)
    encode = encode_text_fn(ours)
    assert relative_error(encode(zero_padded), txt) <= 1e-5
    assert relative_error(encode(zero_padded[:, :16]), txt) <= 1e-5


@pytest.mark.parametrize("hw", [(48, 40), (24, 24)])
def test_tiny_other_resolution(tiny_hf, hw):
    """transformers' interpolate_pos_encoding = plain bicubic resampling of the position table."""
    model, _, converted = tiny_hf
    config = dataclasses.replace(converted.config, pos_embed_antialias=False)
    ours = build_clip(config, converted.weights, source_name="tiny")
    images = clip_refs.random_images(2, *hw, seed=1)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output.numpy()
    assert relative_error(encode_image_fn(ours)(images), ref) <= 1e-5


def test_tiny_gelu_and_head_width(tokenizer):
    """Exact GELU and a head width other than 64 (read from the config, not inferred)."""
    config = clip_refs.hf_clip_config(vision=dict(hidden_act="gelu", num_attention_heads=8),
                                         text=dict(hidden_act="gelu", num_attention_heads=4))
    model = clip_refs.hf_clip_model(config, seed=3)
    converted = convert_state_dict(model.state_dict(), "hf", hf_config=config)
    assert converted.config.act == "gelu" and converted.config.vision_heads == 8
    ours = converted.build()
    images = clip_refs.random_images(2, 32, 32, seed=2)
    ids = _hf_ids(tokenizer, PROMPTS[:2])
    img, txt, _ = _reference(model, images, ids)
    o_img, o_txt, _ = _ours(ours, images, ids)
    assert relative_error(o_img, img) <= 1e-5
    assert relative_error(o_txt, txt) <= 1e-5


def test_wrong_activation_is_detected(tiny_hf):
    """The parity above can fail: the same weights with gelu instead of quick_gelu differ."""
    model, _, converted = tiny_hf
    wrong = build_clip(dataclasses.replace(converted.config, act="gelu"), converted.weights, source_name="tiny")
    images = clip_refs.random_images(2, 32, 32)
    img, _, _ = _reference(model, images, np.zeros((1, 4), np.int64))
    assert relative_error(encode_image_fn(wrong)(images), img) > 1e-3


@pytest.mark.full_size
def test_vit_b16_shape(tokenizer):
    """ViT-B/16 shapes (transformers' default config with patch 16), 224x224."""
    config = clip_refs.hf_clip_config(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=16, image_size=224),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512)
    model = clip_refs.hf_clip_model(config, seed=5)
    converted = convert_state_dict(model.state_dict(), "hf", hf_config=config)
    assert converted.config.variant_name() == "vit_b16"
    ours = converted.build()
    images = clip_refs.random_images(2, 224, 224, seed=5)
    ids = _hf_ids(tokenizer, PROMPTS)
    _assert_embeddings_and_logits_match(ours, model, images, ids)

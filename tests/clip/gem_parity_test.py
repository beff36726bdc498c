"""GEM dense features against the reference ``gem`` package (gem-torch 1.0.1 on open_clip 3.3).

The reference runs through ``zsp_jax.references.clip.gem_reference``, which restores the
sequence-first layout of the blocks GEM leaves untouched (see that module: gem-torch with
open_clip >= 2.24 otherwise mixes the images of a batch).
"""

import numpy as np
import pytest
import torch

from zsp_jax.models.clip import GemConfig, convert_state_dict, dense_features_fn
from zsp_jax.references import clip as clip_refs
from zsp_jax.utils.bench import relative_error

TOL = 1e-4  # the bound; measured ~5e-7 on the tiny model and ~1e-6 on ViT-B/16


def _compare(torch_model, converted, images, gem_cfg):
    wrapper = clip_refs.gem_reference(torch_model, depth=gem_cfg.depth, ss_attn_iter=gem_cfg.ss_attn_iter,
                                         ss_attn_temp=gem_cfg.ss_attn_temp)
    feat_gem, feat_ori = clip_refs.gem_reference_features(wrapper, images)
    out = dense_features_fn(converted.build(), gem_cfg, return_original=True)(images)
    b, gh, gw, d = out.tokens.shape
    assert (gh, gw) == (images.shape[1] // converted.config.patch_size, images.shape[2] // converted.config.patch_size)
    errors = {
        "gem_tokens": relative_error(np.asarray(out.tokens).reshape(b, gh * gw, d), feat_gem[:, 1:]),
        "image_embeds": relative_error(out.image_embeds, feat_ori[:, 0]),
        "original_tokens": relative_error(np.asarray(out.original_tokens).reshape(b, gh * gw, d), feat_ori[:, 1:]),
    }
    return errors, out, feat_gem


@pytest.mark.parametrize("gem_cfg", [GemConfig(depth=3), GemConfig(depth=4, ss_attn_iter=2),
                                     GemConfig(depth=2, ss_attn_iter=0), GemConfig(depth=4, ss_attn_temp=0.7)], ids=str)
def test_tiny_gem(tiny_open_clip, gem_cfg):
    torch_model, converted = tiny_open_clip
    images = clip_refs.random_images(2, 56, 48, seed=1)  # 7x6 grid: positional embedding resampled
    errors, _, _ = _compare(torch_model, converted, images, gem_cfg)
    assert max(errors.values()) <= TOL, errors


def test_tiny_gem_gelu_all_blocks():
    """Exact GELU, GEM over every block (depth = layers + 1), training resolution."""
    torch_model = clip_refs.tiny_open_clip(quick_gelu=False, seed=4)
    converted = convert_state_dict(torch_model.state_dict(), "open_clip", act="gelu")
    errors, _, _ = _compare(torch_model, converted, clip_refs.random_images(3, 32, 32, seed=4), GemConfig(depth=4))
    assert max(errors.values()) <= TOL, errors


def test_gem_differs_from_plain_clip(tiny_open_clip):
    """The GEM path is not the plain path (the comparison above can fail)."""
    torch_model, converted = tiny_open_clip
    images = clip_refs.random_images(1, 32, 32)
    out = dense_features_fn(converted.build(), GemConfig(depth=3), return_original=True)(images)
    assert relative_error(out.tokens, out.original_tokens) > 1e-2


def test_image_embeds_equal_encode_image(tiny_open_clip):
    torch_model, converted = tiny_open_clip
    images = clip_refs.random_images(2, 64, 64, seed=2)
    out = dense_features_fn(converted.build(), GemConfig(depth=3), normalize=True)(images)
    # open_clip's own forward does not resample the positional embedding; GEM's does
    wrapper = clip_refs.gem_reference(torch_model, depth=3)
    _, feat_ori = clip_refs.gem_reference_features(wrapper, images)
    ref = feat_ori[:, 0] / np.linalg.norm(feat_ori[:, 0], axis=-1, keepdims=True)
    assert relative_error(out.image_embeds, ref) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(out.tokens, axis=-1), 1.0, rtol=1e-5)


def test_reference_batch_layout_fix_matters(tiny_open_clip):
    """Without the layout fix the reference's output for an image depends on the other images."""
    import gem

    torch_model, _ = tiny_open_clip
    import copy

    broken = gem.GEMWrapper(copy.deepcopy(torch_model), None, depth=3)
    images = torch.from_numpy(clip_refs.random_images(2, 32, 32).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        both, one = broken.model.visual(images)[0], broken.model.visual(images[:1])[0]
    assert (both[:1] - one).abs().max() > 1e-3
    fixed = clip_refs.gem_reference(torch_model, depth=3)
    with torch.no_grad():
        both, one = fixed.model.visual(images)[0], fixed.model.visual(images[:1])[0]
    assert (both[:1] - one).abs().max() <= 1e-5


@pytest.mark.full_size
def test_vit_b16_gem_448():
    """ViT-B/16 vision tower + GEM at GEM's default 448x448 (28x28 grid, positions resampled 14->28).

    The text tower is kept tiny: GEM does not read it, and randomising a full one costs time.
    """
    torch_model = clip_refs.open_clip_model(dict(layers=12, width=768, patch_size=16, image_size=224),
                                               dict(context_length=77, width=64, heads=1, layers=1), 512,
                                               quick_gelu=True, seed=7)
    converted = convert_state_dict(torch_model.state_dict(), "open_clip", act="quick_gelu")
    assert converted.config.vision_heads == 12 and converted.config.grid_size == 14
    errors, out, _ = _compare(torch_model, converted, clip_refs.random_images(2, 448, 448, seed=7), GemConfig())
    assert out.tokens.shape == (2, 28, 28, 512)
    assert max(errors.values()) <= TOL, errors

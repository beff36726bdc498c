"""Fixtures shared by the CLIP / GEM tests: tokenizers, tiny randomised references, images."""

from __future__ import annotations

import numpy as np
import pytest

from zsp_jax.references import clip as clip_refs


@pytest.fixture(scope="session")
def tokenizer():
    from zsp_jax.models.clip import ClipTokenizer

    return ClipTokenizer.load()


@pytest.fixture(scope="session")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="session")
def tiny_open_clip():
    """(torch model, its conversion): quick_gelu, 3 vision / 2 text layers."""
    from zsp_jax.models.clip import convert_state_dict

    model = clip_refs.tiny_open_clip(quick_gelu=True, seed=0)
    return model, convert_state_dict(model.state_dict(), "open_clip", act="quick_gelu")


@pytest.fixture(scope="session")
def tiny_hf():
    """(torch CLIPModel, its transformers config, its conversion)."""
    from zsp_jax.models.clip import convert_state_dict

    config = clip_refs.hf_clip_config()
    model = clip_refs.hf_clip_model(config, seed=0)
    return model, config, convert_state_dict(model.state_dict(), "hf", hf_config=config)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photographs bundled with scikit-image (uint8 RGB, three sizes)."""
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


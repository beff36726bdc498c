"""Shared fixtures of the labeller tests: a tiny SAM pair and a tiny CLIP pair (reference and ours, same
random weights), and labeller options that leave many segments with random weights."""

import jax
import pytest

from zsp_jax.models.sam import SamConfig
from zsp_jax.references.amg import reference_pair

SAM_IMAGE_SIZE = 256  # tiny SAM: 16 x 16 embedding grid


@pytest.fixture(scope="session")
def sam_pair():
    return reference_pair(SamConfig.tiny(image_size=SAM_IMAGE_SIZE), 0)


@pytest.fixture(scope="session")
def clip_pair():
    """(open_clip model, GEM reference wrapper, our ClipModel, tokenizer) with the same random weights."""
    from zsp_jax.models.clip import ClipTokenizer
    from zsp_jax.models.clip.convert import convert_state_dict
    from zsp_jax.references.clip import gem_reference, tiny_open_clip

    ref = tiny_open_clip(quick_gelu=True, seed=3)
    ours = convert_state_dict(ref.state_dict(), "open_clip", act="quick_gelu").build()
    return ref, gem_reference(ref, depth=3), ours, ClipTokenizer.load()


@pytest.fixture(scope="session")
def one_device_mesh():
    from zsp_jax.utils.sharding import data_mesh

    return data_mesh(jax.devices()[:1])

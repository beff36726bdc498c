"""Shared fixtures of the AMG tests: a tiny SAM pair (reference and zsp_jax, same random weights)."""

import pytest

from zsp_jax.models.sam import SamConfig
from zsp_jax.references.amg import reference_pair

# 256 x 256 encoder input -> 16 x 16 embedding grid and 64 x 64 low-resolution logits.
IMAGE_SIZE = 256


@pytest.fixture(scope="session")
def tiny_config() -> SamConfig:
    return SamConfig.tiny(image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def sam_pair(tiny_config):
    """(reference segment-anything Sam, zsp_jax Sam) with the same random weights."""
    return reference_pair(tiny_config, 0)

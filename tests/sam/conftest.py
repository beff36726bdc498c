"""Fixtures shared by the SAM tests: a tiny randomised reference, its conversion, images, prompts."""

from __future__ import annotations

import numpy as np
import pytest

from zsp_jax.models.sam import SamConfig
from zsp_jax.references import sam as sam_refs


@pytest.fixture(scope="session")
def tiny_config() -> SamConfig:
    return SamConfig.tiny(image_size=256)


@pytest.fixture(scope="session")
def tiny_pair(tiny_config):
    """(segment-anything Sam with every tensor random, zsp_jax Sam with the converted weights)."""
    ref = sam_refs.reference_sam(tiny_config, seed=0)
    return ref, sam_refs.flax_sam_from_reference(ref, tiny_config)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photographs bundled with scikit-image (uint8 RGB; square, landscape and portrait)."""
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.chelsea(), np.ascontiguousarray(skimage.data.coffee()[:, ::-1]
                                                                                    .transpose(1, 0, 2))]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

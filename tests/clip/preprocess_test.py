"""GEM's image transform, host (PIL) and device (jitted) versions, against gem.get_gem_img_transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from zsp_jax.models.clip import gem_preprocess, gem_preprocess_batch
from zsp_jax.models.clip.preprocess import pil_resize_bicubic


@pytest.fixture(scope="module")
def gem_transform():
    from gem import get_gem_img_transform

    return get_gem_img_transform()


def _reference(transform, image: np.ndarray) -> np.ndarray:
    return transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)


def test_host_equals_reference(photos, gem_transform):
    for image in photos:
        out = gem_preprocess(image)
        assert out.shape == (448, 448, 3) and out.dtype == np.float32
        np.testing.assert_array_equal(out, _reference(gem_transform, image))
    np.testing.assert_array_equal(gem_preprocess(Image.fromarray(photos[1])), _reference(gem_transform, photos[1]))


@pytest.mark.parametrize("size", [(448, 448), (224, 320), (512, 512)])
def test_device_resize_is_pil_bit_for_bit(photos, size):
    resize = jax.jit(pil_resize_bicubic, static_argnums=1)
    for image in photos + [np.random.default_rng(0).integers(0, 256, (37, 300, 3), dtype=np.uint8)]:
        ref = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
        np.testing.assert_array_equal(np.asarray(resize(jnp.asarray(image[None]), size))[0], ref)


def test_device_batch_equals_reference(photos, gem_transform):
    batch = np.stack([photos[0], np.ascontiguousarray(photos[0][:, ::-1])])
    out = np.asarray(jax.jit(gem_preprocess_batch)(jnp.asarray(batch)))
    for i in range(2):
        np.testing.assert_allclose(out[i], _reference(gem_transform, batch[i]), rtol=0, atol=1e-6)


def test_input_checks():
    with pytest.raises(ValueError):
        gem_preprocess(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        gem_preprocess_batch(jnp.zeros((1, 8, 8, 3), jnp.float32))

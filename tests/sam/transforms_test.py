"""Pre- and post-processing against segment-anything's ResizeLongestSide / Sam.preprocess / postprocess_masks."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zsp_jax.models.sam import transforms
from zsp_jax.utils.bench import relative_error


def reference_sam_stub(image_size: int):
    """The two reference methods need only ``image_encoder.img_size`` and the pixel statistics."""
    from segment_anything.modeling import Sam

    stub = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=image_size),
                                 pixel_mean=torch.tensor(transforms.PIXEL_MEAN).view(-1, 1, 1),
                                 pixel_std=torch.tensor(transforms.PIXEL_STD).view(-1, 1, 1))
    return stub, Sam


def test_resize_shape_rounding_matches_reference():
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 2, 3, 7, 255, 256, 257, 333, 480, 500, 1023, 1024, 1025, 4000)
             for w in (1, 5, 640, 375, 1024, 1999)] + [tuple(rng.integers(1, 5000, 2)) for _ in range(500)]
    for target in (256, 1024, 1000):
        for h, w in sizes:
            assert transforms.resize_longest_side_shape(int(h), int(w), target) == \
                ResizeLongestSide.get_preprocess_shape(int(h), int(w), target)


@pytest.mark.parametrize("image_size", [1024, 256])
def test_preprocess_equals_reference(photos, image_size):
    """Bit-identical to ResizeLongestSide.apply_image + Sam.preprocess on real photographs."""
    from segment_anything.utils.transforms import ResizeLongestSide

    stub, Sam = reference_sam_stub(image_size)
    resize = ResizeLongestSide(image_size)
    odd = np.random.default_rng(1).integers(0, 256, size=(333, 517, 3), dtype=np.uint8)
    for photo in photos + [odd]:
        x, input_size = transforms.preprocess(photo, image_size)
        resized = torch.as_tensor(resize.apply_image(photo)).permute(2, 0, 1).contiguous()
        want = Sam.preprocess(stub, resized).numpy().transpose(1, 2, 0)
        assert x.shape == (image_size, image_size, 3) and x.dtype == np.float32
        assert input_size == tuple(resized.shape[-2:])
        np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("image_size", [1024, 256])
def test_preprocess_jax_within_one_grey_level(photos, image_size):
    """The device path (float weights, PIL in fixed point): at most one level apart, on < 0.5 % of values.

    Measured: 0 to 0.14 % of values differ, by exactly one level (up- and downsampling).
    """
    fn = jax.jit(transforms.preprocess_jax, static_argnums=1)
    big = np.random.default_rng(1).integers(0, 256, size=(1500, 900, 3), dtype=np.uint8)
    for photo in photos + [big]:
        want, _ = transforms.preprocess(photo, image_size)
        got = np.asarray(fn(jnp.asarray(photo), image_size))
        levels = np.abs(got - want) * np.asarray(transforms.PIXEL_STD, np.float32)
        assert levels.max() <= 1.0 + 1e-3
        assert np.mean(levels > 0.5) < 0.005


def test_apply_coords_and_boxes_match_reference():
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(2)
    resize = ResizeLongestSide(1024)
    for size in [(480, 640), (1500, 333), (77, 77)]:
        pts = rng.uniform(0, 500, size=(5, 3, 2))
        boxes = rng.uniform(0, 500, size=(7, 4))
        np.testing.assert_array_equal(transforms.apply_coords(pts, size, 1024),
                                      resize.apply_coords(pts, size).astype(np.float32))
        np.testing.assert_array_equal(transforms.apply_boxes(boxes, size, 1024),
                                      resize.apply_boxes(boxes, size).astype(np.float32))
        got = transforms.apply_coords(jnp.asarray(pts, jnp.float32), size, 1024)
        assert relative_error(got, resize.apply_coords(pts, size)) <= 1e-6


@pytest.mark.parametrize("image_size,original", [
    (1024, (480, 640)),    # downsample 1024 -> 640 wide
    (1024, (1500, 2000)),  # upsample past the input size
    (1024, (300, 451)),
    (256, (100, 70)),      # strong downsampling (no antialiasing, as torch)
    (256, (512, 512)),
    (256, (256, 171)),     # original == input size: no second resize
])
def test_postprocess_masks_matches_reference(image_size, original):
    stub, Sam = reference_sam_stub(image_size)
    input_size = transforms.resize_longest_side_shape(*original, image_size)
    s = image_size // 4
    logits = np.random.default_rng(3).normal(size=(2, 3, s, s)).astype(np.float32) * 4
    want = Sam.postprocess_masks(stub, torch.from_numpy(logits), input_size, original).numpy()
    fn = jax.jit(transforms.postprocess_masks, static_argnums=(1, 2, 3))
    got = np.asarray(fn(jnp.asarray(logits), input_size, original, image_size))
    assert got.shape == want.shape == (2, 3) + original
    assert relative_error(got, want) <= 1e-5
    flips = (got > 0) != (want > 0)
    assert not np.any(flips & (np.abs(want) > 1e-3))


def test_normalize_and_pad_rejects_oversized_input():
    with pytest.raises(ValueError, match="does not fit"):
        transforms.normalize_and_pad(np.zeros((300, 10, 3), np.uint8), 256)


def test_preprocess_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        transforms.preprocess(np.zeros((10, 10, 3), np.float32))

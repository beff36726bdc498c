"""Host (PIL) augmentations: UniMatch's weak view semantics and the CutMix box sampler."""

import numpy as np
import pytest

from zsp_jax.data import augment


def _blocks(h, w, rng, num_classes=5, block=24):
    """A mask of large constant blocks (no 255) and an image that colours each class distinctly."""
    coarse = rng.integers(0, num_classes, (h // block + 1, w // block + 1))
    mask = np.kron(coarse, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    lut = np.array([[20, 200, 60], [220, 40, 40], [40, 40, 220], [230, 230, 30], [120, 30, 160]], np.uint8)
    return lut[mask], mask, lut


@pytest.mark.parametrize("hw", [(60, 90), (150, 110)])
def test_weak_view_labelled(hw):
    rng = np.random.default_rng(0)
    size = 96
    image, mask, lut = _blocks(*hw, rng)
    agree = []
    for _ in range(60):
        img, m = augment.weak_view(image, mask, size, rng)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8 and m.shape == (size, size)
        pad = m == 255  # the source mask has no 255: every 255 is padding
        assert (img[pad] == 0).all()
        # padding sits right/bottom of the resized image (left after a flip): the valid part is a rectangle
        rows, cols = np.flatnonzero((~pad).any(1)), np.flatnonzero((~pad).any(0))
        assert rows[0] == 0 and (rows == np.arange(len(rows))).all()
        assert cols[0] == 0 or cols[-1] == size - 1
        assert (~pad[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]).all()
        # image and mask were resized, cropped and flipped together
        valid = ~pad
        close = np.abs(img.astype(int) - lut[np.where(valid, m, 0)].astype(int)).max(-1) <= 12
        agree.append(close[valid].mean())
    assert np.mean(agree) > 0.93


def test_weak_view_unlabelled_ignore_marks_exactly_the_padding():
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (50, 70, 3)).astype(np.uint8)  # no zero pixel: zeros can only be padding
    seen_pad = False
    for _ in range(40):
        img, ignore = augment.weak_view(image, None, 96, rng)
        assert set(np.unique(ignore)) <= {0, 255}
        np.testing.assert_array_equal(ignore == 255, (img == 0).all(-1))
        seen_pad |= bool((ignore == 255).any())
    assert seen_pad


def test_resize_range_and_aspect():
    rng = np.random.default_rng(2)
    h, w = 375, 500
    sides = [augment.sample_long_side(h, w, rng) for _ in range(4000)]
    assert min(sides) == 250 and max(sides) == 1000  # randint(int(0.5 L), int(2.0 L)), both ends inclusive
    assert abs(np.mean(sides) - 625) < 12
    for long_side in (250, 333, 999):
        oh, ow = augment.rescale_size(h, w, long_side)
        assert ow == long_side and oh == int(h * long_side / w + 0.5)
        oh, ow = augment.rescale_size(w, h, long_side)
        assert oh == long_side and ow == int(h * long_side / w + 0.5)


def test_flip_probability():
    rng = np.random.default_rng(3)
    ramp = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (120, 200, 3)).copy() + 30
    flipped = 0
    n = 400
    for _ in range(n):
        img, ignore = augment.weak_view(ramp, None, 64, rng)
        row = img[0, :, 0].astype(int)[ignore[0] == 0]
        flipped += int(row[-1] < row[0])
    assert abs(flipped / n - 0.5) < 0.1  # 4 sigma


def test_host_cutmix_box_statistics():
    rng = np.random.default_rng(4)
    size = 96
    boxes = np.stack([augment.sample_cutmix_box(size, rng) for _ in range(4000)])
    on = boxes[:, 2] > 0
    assert abs(on.mean() - 0.5) < 0.04
    y, x, h, w = boxes[on].T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= size).all() and (x + w <= size).all()
    area = h * w / size**2
    assert area.min() >= 0.015 and area.max() <= 0.4  # int() truncation shrinks boxes slightly below 0.02
    aspect = h / w
    assert aspect.min() > 0.25 and aspect.max() < 3.6
    m = augment.box_mask(boxes[on][0], size)
    assert m.sum() == h[0] * w[0]


def test_strong_view_shapes_and_determinism():
    img = np.random.default_rng(5).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    a = augment.strong_view(img, np.random.default_rng(7))
    b = augment.strong_view(img, np.random.default_rng(7))
    assert a[0].shape == img.shape and a[0].dtype == np.uint8 and a[1].shape == (64, 64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_normalize():
    x = np.array([[[0, 128, 255]]], np.uint8)
    expect = (np.array([0, 128, 255]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(augment.normalize(x)[0, 0], expect, rtol=1e-6)

"""The host wrapper: max_masks truncation and its warnings, input checks, the progress bar."""

import warnings

import jax
import numpy as np
import pytest

from zsp_jax.amg import AmgOptions, AutomaticMaskGenerator, data_mesh
from zsp_jax.references.amg import masks_of, sample_images

# 4 x 4 points, no filters and no NMS: all 48 candidates of layer 0 survive.
ALL = AmgOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
                 box_nms_thresh=1.0, crop_nms_thresh=1.0)


def _generator(model, options):
    return AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=1)


def test_truncation_keeps_the_best_and_warns(sam_pair, capsys):
    _, model = sam_pair
    image = sample_images([(150, 200)])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fits: no warning
        full = _generator(model, ALL.replace(max_masks=64)).generate_batch([image], progress=True)[0]
    assert "1/1" in capsys.readouterr().err  # the progress bar ran to the end
    assert len(full) == 48
    scores = [r["predicted_iou"] for r in full]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 40  # NMS order: best first
    with pytest.warns(UserWarning, match="more than max_masks=10 masks survived"):
        cut = _generator(model, ALL.replace(max_masks=10)).generate(image)
    assert len(cut) == 10
    assert [r["predicted_iou"] for r in cut] == scores[:10]
    np.testing.assert_array_equal(masks_of(cut), masks_of(full[:10]))


def test_truncation_inside_a_crop_warns(sam_pair):
    """A crop keeps more than max_masks before the cross-crop NMS, which then leaves fewer than max_masks."""
    _, model = sam_pair
    image = sample_images([(150, 200)])[0]
    options = ALL.replace(crop_n_layers=1, crop_nms_thresh=0.7, max_masks=10)
    with pytest.warns(UserWarning, match=r"crop\(s\) kept more than max_masks=10"):
        records = _generator(model, options).generate(image)
    assert 1 <= len(records) < 10


def test_bad_images_are_rejected(sam_pair):
    _, model = sam_pair
    gen = _generator(model, ALL)
    rgb = sample_images([(40, 50)])[0]
    for bad in (rgb[..., 0], np.concatenate([rgb, rgb[..., :1]], axis=-1), rgb.astype(np.float32), rgb[:0]):
        with pytest.raises(ValueError, match="image"):
            gen.generate(bad)
    with pytest.raises(ValueError, match="too small for crop_n_layers=1"):
        _generator(model, ALL.replace(crop_n_layers=1)).generate(rgb[:1, :1])
    two = AutomaticMaskGenerator(model, ALL, mesh=data_mesh(jax.devices()[:1]), batch_size=2)
    with pytest.raises(ValueError, match="not in the bucket"):
        two.generate_padded([rgb, sample_images([(100, 50)])[0]])
    with pytest.raises(ValueError, match="expected 1..2 images"):
        two.generate_padded([rgb] * 3)

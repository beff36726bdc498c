"""SamPredictor against segment-anything's SamPredictor (tiny randomised model, real photographs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsp_jax.models.sam import SamPredictor
from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error

TOL = 1e-4


@pytest.fixture(scope="module")
def predictors(tiny_pair, photos):
    """(ours, reference) with the same (non-square) photo set."""
    from segment_anything import SamPredictor as RefPredictor

    ref, model = tiny_pair
    ours, theirs = SamPredictor(model), RefPredictor(ref)
    photo = photos[2]  # portrait: padding on the right
    ours.set_image(photo)
    theirs.set_image(photo)
    return ours, theirs, photo


def check(ours_out, ref_masks, ref_iou, ref_low, ref_logits):
    masks, iou, low = ours_out
    assert masks.shape == ref_masks.shape and masks.dtype == bool
    assert relative_error(low, ref_low) <= TOL
    assert relative_error(iou, ref_iou) <= TOL
    bad, _ = sam_refs.mask_disagreement(masks, ref_logits)
    assert bad == 0


def test_embedding(predictors):
    ours, theirs, _ = predictors
    want = theirs.get_image_embedding().numpy().transpose(0, 2, 3, 1)
    assert ours.input_size == theirs.input_size and ours.original_size == theirs.original_size
    assert relative_error(ours.get_image_embedding(), want) <= TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_single_prompt(predictors, multimask):
    """Unbatched call, as in the reference's notebooks: (P, 2) points, one box."""
    ours, theirs, photo = predictors
    h, w = photo.shape[:2]
    pts = np.array([[0.3 * w, 0.4 * h], [0.6 * w, 0.5 * h]])
    labels = np.array([1, 0])
    box = np.array([0.1 * w, 0.1 * h, 0.8 * w, 0.7 * h])
    want = theirs.predict(pts, labels, box, multimask_output=multimask)
    logits = theirs.predict(pts, labels, box, multimask_output=multimask, return_logits=True)[0]
    got = ours.predict(pts, labels, box, multimask_output=multimask)
    assert got[0].shape == (3 if multimask else 1, h, w)
    check(got, *want, logits)


def test_batched_points_match_reference_batch(predictors):
    """N = 5 prompts in one call (bucketed to 8) against the reference's predict_torch on the same batch."""
    ours, theirs, photo = predictors
    h, w = photo.shape[:2]
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, [w, h], size=(5, 3, 2))
    labels = rng.integers(0, 2, size=(5, 3))
    coords = torch.as_tensor(theirs.transform.apply_coords(pts, (h, w)), dtype=torch.float)
    want = theirs.predict_torch(coords, torch.as_tensor(labels), multimask_output=True)
    logits = theirs.predict_torch(coords, torch.as_tensor(labels), multimask_output=True, return_logits=True)[0]
    got = ours.predict(pts, labels, multimask_output=True)
    check(got, *(t.numpy() for t in want), logits.numpy())


def test_boxes_and_mask_input(predictors):
    ours, theirs, photo = predictors
    h, w = photo.shape[:2]
    boxes = np.array([[10, 20, 0.5 * w, 0.6 * h], [0.2 * w, 0.3 * h, w - 1, h - 1], [0, 0, w, h]])
    b_in = torch.as_tensor(theirs.transform.apply_boxes(boxes, (h, w)), dtype=torch.float)
    _, _, low0 = theirs.predict_torch(None, None, b_in, multimask_output=False)
    want = theirs.predict_torch(None, None, b_in, low0, multimask_output=False)
    logits = theirs.predict_torch(None, None, b_in, low0, multimask_output=False, return_logits=True)[0]
    got = ours.predict(box=boxes, mask_input=low0.numpy(), multimask_output=False)
    check(got, *(t.numpy() for t in want), logits.numpy())


def test_bucketing_does_not_change_results(tiny_pair, predictors):
    ours, _, photo = predictors
    plain = SamPredictor(tiny_pair[1], bucket_prompts=False)
    plain.features, plain.input_size, plain.original_size = ours.features, ours.input_size, ours.original_size
    pts = np.random.default_rng(1).uniform(0, 200, size=(3, 1, 2))
    a = ours.predict(pts, np.ones((3, 1)), return_logits=True)
    b = plain.predict(pts, np.ones((3, 1)), return_logits=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_bgr_input_is_flipped(tiny_pair, photos):
    ours = SamPredictor(tiny_pair[1])
    ours.set_image(photos[0][..., ::-1].copy(), image_format="BGR")
    rgb = SamPredictor(tiny_pair[1])
    rgb.set_image(photos[0])
    np.testing.assert_array_equal(np.asarray(ours.features), np.asarray(rgb.features))


def test_errors(tiny_pair):
    p = SamPredictor(tiny_pair[1])
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(np.zeros((1, 2)), np.ones(1))
    p.set_image(np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        p.predict(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="disagree"):
        p.predict(np.zeros((2, 1, 2)), np.ones((2, 1)), box=np.zeros((3, 4)))

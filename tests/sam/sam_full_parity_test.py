"""Full-size parity: SAM vit_b at 1024 x 1024 against segment-anything, through a converted checkpoint.

The reference is ``sam_model_registry["vit_b"]`` with every tensor randomised, saved with
``torch.save`` and converted with ``convert_checkpoint`` (so this is also the vit_b converter
test). One reference image encoding costs 10-16 s on the 2-core CI machine, so the predictors
and every reference output are computed once per module and shared by the assertions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsp_jax.models.sam import SamConfig, SamPredictor, convert_checkpoint, load_sam
from zsp_jax.testing import sam as sam_testing
from zsp_jax.utils.bench import relative_error

pytestmark = pytest.mark.full_size
TOL = 1e-4


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory, photos):
    from segment_anything import SamPredictor as RefPredictor

    ref = sam_testing.registry_sam("vit_b", seed=0)
    tmp = tmp_path_factory.mktemp("vit_b")
    torch.save(ref.state_dict(), tmp / "sam_vit_b.pth")
    config = convert_checkpoint(tmp / "sam_vit_b.pth", tmp / "sam_vit_b.safetensors", variant="vit_b")
    model, loaded = load_sam(tmp / "sam_vit_b.safetensors")
    photo = photos[1]  # 300 x 451: resized to 681 x 1024, padded at the bottom
    h, w = photo.shape[:2]
    theirs, ours = RefPredictor(ref), SamPredictor(model)
    theirs.set_image(photo)
    ours.set_image(photo)

    grid = (np.stack(np.meshgrid(np.linspace(0.1, 0.9, 4), np.linspace(0.1, 0.9, 4)), -1).reshape(16, 1, 2)
            * [w, h])
    coords = torch.as_tensor(theirs.transform.apply_coords(grid, (h, w)), dtype=torch.float)
    labels = torch.ones(16, 1, dtype=torch.int)
    boxes = np.array([[0.1 * w, 0.1 * h, 0.6 * w, 0.8 * h], [0.5 * w, 0.2 * h, 0.95 * w, 0.9 * h]])
    b_in = torch.as_tensor(theirs.transform.apply_boxes(boxes, (h, w)), dtype=torch.float)
    ref_points = [t.numpy() for t in theirs.predict_torch(coords, labels, multimask_output=True, return_logits=True)]
    ref_boxes = [t.numpy() for t in theirs.predict_torch(None, None, b_in, multimask_output=False,
                                                         return_logits=True)]
    return dict(config=config, loaded=loaded, ours=ours, theirs=theirs, grid=grid, boxes=boxes,
                ref_points=ref_points, ref_boxes=ref_boxes,
                ours_points=ours.predict(grid, np.ones((16, 1)), multimask_output=True, return_logits=True),
                ours_boxes=ours.predict(box=boxes, multimask_output=False, return_logits=True))


def test_converted_config(vit_b):
    assert vit_b["config"] == vit_b["loaded"] == SamConfig.vit_b()


def test_image_embedding(vit_b):
    want = vit_b["theirs"].get_image_embedding().numpy().transpose(0, 2, 3, 1)
    got = vit_b["ours"].get_image_embedding()
    assert got.shape == (1, 64, 64, 256)
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_low_res_logits_and_iou(vit_b, kind):
    ref_logits, ref_iou, ref_low = vit_b[f"ref_{kind}"]
    logits, iou, low = vit_b[f"ours_{kind}"]
    assert low.shape == ref_low.shape and low.shape[-2:] == (256, 256)
    assert relative_error(low, ref_low) <= TOL
    assert relative_error(iou, ref_iou) <= TOL
    assert relative_error(logits, ref_logits) <= TOL


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_final_masks(vit_b, kind):
    """Binary masks at the original size are identical except where the reference logit is within 1e-3 of 0."""
    ref_logits = vit_b[f"ref_{kind}"][0]
    logits = vit_b[f"ours_{kind}"][0]
    assert logits.shape == ref_logits.shape and logits.shape[-2:] == (300, 451)
    bad, near = sam_testing.mask_disagreement(logits > 0, ref_logits)
    assert bad == 0, f"{bad} pixels differ away from the threshold ({near} within 1e-3 of it)"
    assert 0.01 < np.mean(ref_logits > 0) < 0.99  # the masks are not trivially empty or full

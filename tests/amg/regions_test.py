"""min_mask_region_area post-processing against segment-anything's (OpenCV) implementation."""

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils import amg as ref_amg

from zsp_jax.amg.regions import masks_to_boxes, postprocess_small_regions, remove_small_regions


def _blobs(seed, n=12, hw=(64, 80)):
    """Masks with holes and islands of many sizes (thresholded smoothed noise in a random window)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        noise = rng.standard_normal((hw[0] // 4 + 2, hw[1] // 4 + 2))
        up = np.kron(noise, np.ones((4, 4)))[: hw[0], : hw[1]]
        up += rng.standard_normal(hw) * (0.6 if i % 2 else 0.1)
        m = up > (0.3 if i % 3 else -0.2)
        y0, x0 = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
        y1, x1 = y0 + rng.integers(hw[0] // 3, hw[0] // 2), x0 + rng.integers(hw[1] // 3, hw[1] // 2)
        window = np.zeros(hw, bool)
        window[y0:y1, x0:x1] = True
        out.append(m & window)
    out.append(np.zeros(hw, bool))
    return np.stack(out)


def test_remove_small_regions_equals_reference():
    for m in _blobs(0):
        for mode in ("holes", "islands"):
            for area in (1, 5, 30, 400):
                a, ca = remove_small_regions(m, area, mode)
                b, cb = ref_amg.remove_small_regions(m, area, mode)
                assert ca == cb
                np.testing.assert_array_equal(a, b)


def test_boxes_equal_reference():
    masks = _blobs(1)
    np.testing.assert_array_equal(masks_to_boxes(masks), ref_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy())


def test_postprocess_equals_reference():
    masks = _blobs(2, n=16)
    boxes = masks_to_boxes(masks)
    rles = ref_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    data = ref_amg.MaskData(rles=rles, boxes=boxes.copy(), iou_preds=np.arange(len(masks), dtype=np.float32))
    out = SamAutomaticMaskGenerator.postprocess_small_regions(data, 30, 0.5)
    keep, new_masks, new_boxes = postprocess_small_regions(masks, boxes, 30, 0.5)
    np.testing.assert_array_equal(keep, out["iou_preds"].astype(np.int64))
    np.testing.assert_array_equal(new_boxes, np.asarray(out["boxes"]))
    for m, rle in zip(new_masks, out["rles"]):
        np.testing.assert_array_equal(m, ref_amg.rle_to_mask(rle))
    assert 3 <= len(keep) < len(masks)  # some masks changed, NMS dropped some

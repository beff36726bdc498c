"""RLE and COCO-RLE encodings equal segment-anything's for equal masks."""

import numpy as np
import torch
from segment_anything.utils import amg as ref_amg

from zsp_jax.amg.rle import area_from_rle, coco_encode_rle, masks_to_coco_rle, masks_to_rle, rle_to_mask


def _masks():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = [np.zeros((h, w), bool), np.ones((h, w), bool), rng.random((h, w)) > 0.5]
    m = np.zeros((h, w), bool)
    m[0, 0] = True  # first pixel set: counts start with a 0-run
    masks.append(m)
    m = np.zeros((h, w), bool)
    m[-1, -1] = True
    masks.append(m)
    yy, xx = np.mgrid[:h, :w]
    masks.append((yy - 15) ** 2 + (xx - 30) ** 2 < 100)
    return np.stack(masks)


def test_rle_equals_reference():
    masks = _masks()
    ours = masks_to_rle(masks)
    ref = ref_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert ours == ref
    for rle, m in zip(ours, masks):
        assert all(type(c) is int for c in rle["counts"])
        np.testing.assert_array_equal(rle_to_mask(rle), m)
        np.testing.assert_array_equal(ref_amg.rle_to_mask(rle), m)
        assert area_from_rle(rle) == ref_amg.area_from_rle(rle) == int(m.sum())
    # Column-major input gives the same encodings.
    assert masks_to_rle(np.ascontiguousarray(masks.transpose(0, 2, 1)), transposed=True) == ref


def test_coco_rle_equals_reference():
    masks = _masks()
    ref = [ref_amg.coco_encode_rle(r) for r in ref_amg.mask_to_rle_pytorch(torch.from_numpy(masks))]
    assert masks_to_coco_rle(masks) == ref
    assert [coco_encode_rle(r) for r in masks_to_rle(masks)] == ref
    assert masks_to_rle(masks[:0]) == [] and masks_to_coco_rle(masks[:0]) == []

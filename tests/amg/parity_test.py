"""End-to-end parity with segment-anything's SamAutomaticMaskGenerator (same random weights).

Random weights give speckled masks with near-image-size boxes and small logits (environment.md
section 7), so the settings here are chosen to leave many masks: stability offset 0.05, NMS off
where the candidate path is compared, thresholds that keep a fraction of the candidates. Every
test asserts a minimum number of reference masks so that it cannot pass on zero masks.
"""

import jax
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from zsp_jax.amg import AmgOptions, AutomaticMaskGenerator, data_mesh, records_from_outputs
from zsp_jax.references.amg import mask_iou_matrix, masks_of, match_records, sample_images

# Two images of one size bucket (192 x 256 at bucket 64): one compiled program per option set.
SIZES = [(150, 200), (140, 230)]


def _reference(ref_model, options, images, mask_threshold=0.0):
    ref_model.mask_threshold = mask_threshold
    try:
        gen = SamAutomaticMaskGenerator(ref_model, **options.reference_kwargs())
        with torch.no_grad():
            return [gen.generate(im) for im in images]
    finally:
        del ref_model.mask_threshold  # back to the class attribute


def _ours(model, options, images):
    gen = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=len(images))
    return gen.generate_batch(images)


def _check(ref_records, our_records, *, min_masks, same_order=0.95):
    for ref, ours in zip(ref_records, our_records):
        assert len(ref) >= min_masks, f"only {len(ref)} reference masks: the test would be vacuous"
        m = match_records(ref, ours)
        assert m.ref_fraction >= 0.99 and m.ours_fraction >= 0.99, (len(ref), len(ours), len(m.pairs))
        on_diagonal = sum(i == j for i, j in m.pairs) / len(m.pairs)
        assert on_diagonal >= same_order
        for i, j in m.pairs:
            r, o = ref[i], ours[j]
            assert r.keys() == o.keys() and type(r["segmentation"]) is type(o["segmentation"])
            assert abs(r["predicted_iou"] - o["predicted_iou"]) <= 1e-4
            assert abs(r["stability_score"] - o["stability_score"]) <= 1e-4
            assert r["crop_box"] == o["crop_box"]
            np.testing.assert_allclose(r["point_coords"], o["point_coords"], rtol=0, atol=1e-9)
            assert np.abs(np.subtract(r["bbox"], o["bbox"])).max() <= 1
            assert abs(r["area"] - o["area"]) <= 0.01 * max(r["area"], 1)


def test_candidates_equal_reference(sam_pair):
    """No IoU / stability filter and no NMS: every candidate mask, score and box is compared."""
    ref_model, model = sam_pair
    options = AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         stability_score_offset=0.05, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    images = sample_images(SIZES)
    ref = _reference(ref_model, options, images)
    ours = _ours(model, options, images)
    _check(ref, ours, min_masks=150)
    assert np.std([r["stability_score"] for r in ref[0]]) > 0.02  # scores vary: the comparison means something


def test_filters_equal_reference(sam_pair):
    """Predicted-IoU and stability filters at thresholds that keep part of the candidates."""
    ref_model, model = sam_pair
    options = AmgOptions(points_per_side=8, pred_iou_thresh=0.07, stability_score_thresh=0.1,
                         stability_score_offset=0.05, box_nms_thresh=1.0)
    images = sample_images(SIZES)
    ref = _reference(ref_model, options, images)
    ours = _ours(model, options, images)
    _check(ref, ours, min_masks=30)
    assert all(len(r) < 150 for r in ref)  # the filters removed something


def test_crop_layers_equal_reference(sam_pair):
    """Crop layer 1 (4 crops, 4x4 points each) with crops whose inner edges lie within 20 px of the image
    edges, so that the crop-edge rule keeps masks of every crop; NMS off, the cross-crop order is compared."""
    ref_model, model = sam_pair
    options = AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         stability_score_offset=0.05, box_nms_thresh=1.0, crop_nms_thresh=1.0, crop_n_layers=1,
                         crop_n_points_downscale_factor=2, crop_overlap_ratio=0.8, max_masks=400)
    images = sample_images([(160, 160), (176, 176)])
    ref = _reference(ref_model, options, images)
    ours = _ours(model, options, images)
    _check(ref, ours, min_masks=300)
    crops = {tuple(r["crop_box"]) for r in ref[0]}
    assert len(crops) == 5  # every crop contributed


def test_nms_postprocess_and_coco_rle_equal_reference(sam_pair):
    """The whole pipeline with the reference's NMS defaults, crop layers with the default overlap (the
    crop-edge rule drops masks), min_mask_region_area and COCO RLE output.

    Random-weight masks are speckled with near-image-size boxes, so the default NMS keeps one mask per
    image here: this checks that both keep the same one, after the clean-up. The NMS itself is compared
    with torchvision's on random boxes in nms_test.py, the clean-up on many masks below."""
    ref_model, model = sam_pair
    options = AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.05,
                         stability_score_offset=0.05, crop_n_layers=1, crop_n_points_downscale_factor=2,
                         min_mask_region_area=30, output_mode="coco_rle")
    images = sample_images(SIZES)
    ref = _reference(ref_model, options, images)
    ours = _ours(model, options, images)
    _check(ref, ours, min_masks=1)
    for r, o in zip(ref, ours):
        assert [x["segmentation"] for x in r] == [x["segmentation"] for x in o]  # identical encodings


def test_explicit_grids_threshold_and_uncompressed_rle_equal_reference(sam_pair):
    """Explicit point grid (not a multiple of points_per_batch), a non-zero mask threshold, uncompressed RLE."""
    ref_model, model = sam_pair
    grid = np.random.default_rng(0).uniform(0.02, 0.98, (45, 2))
    options = AmgOptions(points_per_side=None, point_grids=(grid,), points_per_batch=16, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0, stability_score_offset=0.05, box_nms_thresh=1.0,
                         mask_threshold=0.02, output_mode="uncompressed_rle")
    images = sample_images(SIZES)
    ref = _reference(ref_model, options, images, mask_threshold=0.02)
    ours = _ours(model, options, images)
    _check(ref, ours, min_masks=120)
    for r, o in zip(ref, ours):
        matched = [(x["segmentation"], y["segmentation"]) for x, y in zip(r, o)]
        assert sum(a == b for a, b in matched) >= 0.9 * len(matched)  # equal masks -> equal encodings


def test_min_mask_region_area_on_many_masks_equal_reference(sam_pair):
    """min_mask_region_area on every mask of a crop-layer run (NMS off, so nothing hides the clean-up): the
    cleaned masks, boxes and order equal the reference's. Random-weight masks are speckled, so every one of
    them has a small hole or island and changes; regions_test.py covers a mix of changed and unchanged masks."""
    ref_model, model = sam_pair
    options = AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.05,
                         stability_score_offset=0.05, box_nms_thresh=1.0, crop_nms_thresh=1.0, crop_n_layers=1,
                         crop_n_points_downscale_factor=2, crop_overlap_ratio=0.8, max_masks=400,
                         min_mask_region_area=30)
    images = sample_images([(160, 160), (176, 176)])  # one bucket: a single generate_padded call
    ref = _reference(ref_model, options, images)
    gen = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=len(images))
    out, plan = gen.generate_padded(images)
    out = jax.tree.map(np.asarray, out)
    ours = [records_from_outputs(out, row, im.shape[:2], plan) for row, im in enumerate(images)]
    _check(ref, ours, min_masks=150)
    for row, (im, records) in enumerate(zip(images, ours)):
        h, w = im.shape[:2]
        raw = out.masks[row, : int(out.valid[row].sum()), :h, :w]
        assert len(records) == len(raw)  # NMS at max(box, crop) = 1.0 drops nothing
        changed = mask_iou_matrix(masks_of(records), raw).max(axis=1) < 1.0
        assert changed.mean() >= 0.9, changed.mean()  # the clean-up really changed the masks compared above

"""The figures, the verdicts and the report files of the parity command, on constructed inputs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from zsp_jax.parity import measures, report
from zsp_jax.parity.comparisons import LabelPicture, candidate_amg, point_grid
from zsp_jax.parity.estimate import sam_flops
from zsp_jax.parity.tolerances import TOLERANCES, Row


def test_tensor_figure_is_the_tests_relative_error_per_image():
    ref = [np.array([1.0, -2.0, 4.0]), np.array([10.0, 0.0])]
    ours = [np.array([1.0, -2.0, 4.004]), np.array([10.0, 0.05])]
    fig = measures.tensor_figure(ours, ref)
    assert fig.count == 5
    assert fig.worst == pytest.approx(0.005)  # 0.05 / 10 (second image) > 0.004 / 4 (first image)
    assert fig.median == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        measures.tensor_figure([np.zeros(2)], [np.zeros(3)])


def test_fraction_figure_leaves_out_images_with_nothing_to_compare():
    fig = measures.fraction_figure([9, 0, 3], [10, 0, 4])
    assert (fig.worst, fig.median, fig.count) == (0.75, pytest.approx(0.825), 14)
    assert measures.fraction_figure([0, 0], [0, 0]).count == 0


def test_rows_never_pass_on_nothing_compared():
    empty = Row("amg.masks", "float32/highest", measures.fraction_figure([0], [0], "no masks"), True)
    assert empty.verdict == "EMPTY" and empty.failed
    assert empty.failure_line() == "FAIL amg.masks: compared nothing (no masks)"
    bad = Row("clip.gem_features", "float32/highest", measures.Figure(3.1e-2, 1e-3, 10), True)
    assert bad.verdict == "FAIL" and bad.failure_line() == "FAIL clip.gem_features: max rel 3.1e-02 > 1e-04"
    low = Row("label.pixels", "float32/highest", measures.Figure(0.931, 0.99, 100), True)
    assert low.failure_line() == "FAIL label.pixels: agree 93.10% < 99%"
    extra = Row("clip.gem_features", "bfloat16/highest", measures.Figure(3.1e-2, 1e-3, 10), False)
    assert extra.verdict == "-" and not extra.failed
    assert report.summary([bad, low, extra]).splitlines() == [bad.failure_line(), low.failure_line()]
    good = Row("sam.image_embedding", "float32/highest", measures.Figure(1e-6, 1e-7, 10), True)
    assert report.summary([good, extra]).startswith("PASS")
    assert set(TOLERANCES) >= {"sam.image_embedding", "amg.masks", "label.pixels", "deeplab.argmax"}


def test_mask_pairs_need_iou_099_both_ways():
    masks = np.zeros((3, 20, 20), bool)
    masks[0, :10], masks[1, 10:], masks[2, :, :5] = True, True, True
    moved = masks.copy()
    moved[2] = np.roll(masks[2], 1, axis=1)  # IoU 4/6: no pair
    pairs = measures.pair_masks(masks, moved[[1, 0, 2]])
    assert sorted(pairs.pairs) == [(0, 1), (1, 0)] and pairs.both_ways == pytest.approx(2 / 3)
    assert measures.pair_masks(masks, moved[:0]).both_ways == 0.0


def test_point_grid_and_candidate_settings():
    grid = point_grid((100, 200), 2)
    np.testing.assert_allclose(grid, [[50, 25], [150, 25], [50, 75], [150, 75]])
    from zsp_jax.parity import ours

    defaults = ours.label_options(ours.default_label_section(), "voc")  # the labeller's AMG defaults: 32 x 32
    cand = candidate_amg(defaults.amg.replace(crop_n_layers=1))
    assert (cand.points_per_side, cand.pred_iou_thresh, cand.stability_score_thresh) == (8, 0.0, 0.0)
    assert cand.box_nms_thresh == 1.0 and cand.crop_nms_thresh == 1.0
    assert cand.max_masks == 3 * 64 * (1 + 4)  # every candidate of the 8x8 grid over the image and 4 crops


def test_vit_h_estimate_counts_its_encoder_work():
    """2 x 632M weights x 4096 tokens plus the global attention: about 5.5 TFLOP per ViT-H embedding."""
    import torch
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in sam_model_registry["vit_h"]().state_dict().items()}
    encoder, prompt = sam_flops(shapes)
    assert 5.0e12 < encoder < 6.5e12 and prompt == pytest.approx(3e9)


def test_report_files_and_label_pictures(tmp_path):
    image = np.full((6, 5, 3), 200, np.uint8)
    ours = np.zeros((6, 5), np.uint8)
    ref = ours.copy()
    ref[0, 0] = 3
    rows = [Row("label.pixels", "float32/highest", measures.Figure(29 / 30, 29 / 30, 30, "a | b"), True),
            Row("label.pixels", "bfloat16/highest", measures.Figure(float("nan"), float("nan"), 0), False)]
    header = {"machine": "test", "command": "python -m zsp_jax.parity", "inputs": ["1 image"], "notes": {"amg": "x"}}
    json_path, md_path = report.write(str(tmp_path), rows, header, [LabelPicture("a.png", image, ours, ref, 29 / 30)])
    from PIL import Image

    pic = np.asarray(Image.open(tmp_path / "label_0.png").convert("RGB"))
    assert pic.shape == (6, 3 * 5 + 8, 3)
    assert tuple(pic[0, 2 * 5 + 8]) == (255, 0, 0) and tuple(pic[1, 2 * 5 + 8]) != (255, 0, 0)
    with open(md_path) as f:
        text = f.read()
    assert "![a.png](label_0.png)" in text and "96.667% of pixels agree" in text and "a / b" in text
    with open(json_path) as f:
        data = json.load(f)
    assert data["pictures"] == ["label_0.png"] and not data["passed"]
    assert data["rows"][1]["worst"] is None and data["rows"][1]["verdict"] == "EMPTY"
    assert math.isnan(rows[1].figure.worst) and os.path.exists(md_path)
    assert "96.67%" in report.console_table(rows) and "(figures only)" in report.console_table(rows)

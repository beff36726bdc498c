"""Segment -> class -> label map on constructed inputs whose right answer is known (no models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsp_jax.amg import AmgOptions, Bucket, Plan
from zsp_jax.amg.generate import AmgOutputs
from zsp_jax.label.program import LabelPlan, classify, label_images, label_scores, pool_weights
from zsp_jax.label.options import Rules
from zsp_jax.models.clip import GemConfig


@pytest.mark.parametrize("method,mode", [("bilinear", "bilinear"), ("area", "nearest-exact")])
@pytest.mark.parametrize("n_cells,length", [(8, 64), (28, 500), (28, 333), (14, 37), (4, 3)])
def test_pool_weights_are_torch_interpolation(method, mode, n_cells, length):
    """Row y of the weights = how F.interpolate builds output pixel y from the grid's cells; padding rows 0."""
    canvas = length + 5
    w = np.asarray(pool_weights(n_cells, jnp.int32(length), canvas, method))
    eye = torch.eye(n_cells, dtype=torch.float32).reshape(n_cells, 1, n_cells, 1)  # one basis map per cell
    kw = {"align_corners": False} if mode == "bilinear" else {}
    ref = F.interpolate(eye, size=(length, 1), mode=mode, **kw)[:, 0, :, 0].T.numpy()  # (length, n_cells)
    np.testing.assert_allclose(w[:length], ref, rtol=0, atol=1e-5)  # float32 sample positions on both sides
    assert np.all(w[length:] == 0)
    np.testing.assert_allclose(w[:length].sum(1), 1.0, atol=1e-6)  # a masked average: weights per pixel sum to 1


def _rules(**kw):
    base = dict(row_labels=(1, 2, 3), num_labels=4, no_class="cosine", threshold=0.5)
    base.update(kw)
    return Rules(**base)


def test_classify_rules():
    # label scores of 4 segments over labels (background, a, b, c); background has no prompts
    scores = jnp.asarray([[-np.inf, 0.9, 0.1, 0.0],
                          [-np.inf, 0.2, 0.3, 0.1],   # best cosine 0.3 < 0.5 -> background
                          [-np.inf, 0.6, 0.61, 0.0],
                          [-np.inf, 0.55, 0.5, 0.5]])
    label, best, cos, score = map(np.asarray, classify(scores, _rules()))
    assert label.tolist() == [1, 0, 2, 1] and best.tolist() == [1, 2, 2, 1]
    np.testing.assert_allclose(cos, [0.9, 0.3, 0.61, 0.55], rtol=1e-6)
    label, *_ = classify(scores, _rules(no_class="none"))
    assert np.asarray(label).tolist() == [1, 2, 2, 1]
    # softmax(10 * cos): segments 0 and 1 are confident enough (0.66 for segment 1), 2 and 3 split between classes
    label, _, _, score = map(np.asarray, classify(scores, _rules(no_class="softmax", temperature=10.0, threshold=0.6)))
    expect = np.exp(10 * np.array([0.9, 0.1, 0.0]))
    assert score[0] == pytest.approx(expect[0] / expect.sum(), rel=1e-5)
    assert label.tolist() == [1, 2, 0, 0]
    # background prompts: when the background row wins the label is 0 whatever the threshold
    with_bg = scores.at[:, 0].set(jnp.asarray([0.0, 0.0, 0.7, 0.0]))
    label, best, _, _ = map(np.asarray, classify(with_bg, _rules(row_labels=(0, 1, 2, 3), threshold=0.0)))
    assert label.tolist() == [1, 2, 0, 1] and best[2] == 2  # best non-background class is still reported


def test_label_scores_synonyms():
    text = jnp.eye(3)  # prompts: rows 0, 1 -> label 1 (synonyms); row 2 -> label 2
    emb = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    rules = _rules(row_labels=(1, 1, 2), num_labels=3)
    s_max = np.asarray(label_scores(emb, text, rules))
    s_mean = np.asarray(label_scores(emb, text, Rules(**{**rules.__dict__, "synonyms": "mean"})))
    assert np.isneginf(s_max[:, 0]).all() and np.isneginf(s_mean[:, 0]).all()
    np.testing.assert_allclose(s_max[:, 1:], [[1, 0], [0, 1], [2 ** -0.5, 0]], atol=1e-6)
    np.testing.assert_allclose(s_mean[:, 1:], [[0.5, 0], [0, 1], [2 ** -0.5, 0]], atol=1e-6)


# A 64 x 64 image; SAM input 256 (low-res grid 64: one logit per image pixel). Four rectangular masks:
RECTS = {  # name: (y0, y1, x0, x1)
    "big_top": (0, 40, 0, 64),      # over class-1 features (top), some class-2 rows: class 1
    "small_corner": (2, 14, 2, 14), # inside big_top, over the class-3 corner: class 3
    "bottom": (42, 58, 6, 30),      # over class-2 features: class 2
    "null": (44, 62, 42, 62),       # over features orthogonal to every prompt: background
}


def _constructed_case(paint_order="area_desc", uncovered="ignore", pooling="bilinear", ious=(0.9, 0.8, 0.7, 0.6)):
    options = AmgOptions(points_per_side=1, max_masks=4)
    plan = LabelPlan(Plan.create(options, 256, Bucket.for_size((64, 64), 64), mask_chunk=2),
                     Rules((1, 2, 3), 4, "cosine", 0.5, pooling=pooling, paint_order=paint_order,
                           uncovered=uncovered), GemConfig(), 64)
    low = np.full((4, 64, 64), -8.0, np.float32)
    for k, (y0, y1, x0, x1) in enumerate(RECTS.values()):
        low[k, y0:y1, x0:x1] = 8.0
    zeros = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
    amg = AmgOutputs(masks=None, low_res_logits=jnp.asarray(low), boxes=zeros(4, 4),
                     predicted_iou=jnp.asarray(ious, jnp.float32), stability_score=jnp.zeros(4), area=zeros(4),
                     point_index=zeros(4), layer=zeros(4), crop_index=zeros(4),
                     crop_box=jnp.tile(jnp.asarray([[0, 0, 64, 64]], jnp.int32), (4, 1)),
                     input_hw=jnp.full((4, 2), 256, jnp.int32), valid=jnp.ones(4, bool), num_kept=jnp.int32(4),
                     num_survived=jnp.int32(4), truncated_crops=jnp.int32(0), resize_ok=jnp.bool_(True))
    # Features on an 8 x 8 grid (8 px cells), D = 4: e1 top half, e2 bottom half, e3 the top-left 2 x 2 cells,
    # e0 (matches no prompt) the bottom-right 3 x 3 cells; prompts: e1, e2, e3.
    tokens = np.zeros((8, 8, 4), np.float32)
    tokens[:4, :, 1] = 1
    tokens[4:, :, 2] = 1
    tokens[:2, :2] = [0, 0, 0, 1]
    tokens[5:, 5:] = [1, 0, 0, 0]
    text = jnp.eye(4)[1:]
    batched = jax.tree.map(lambda a: a[None], (amg, tokens))  # one image
    out = jax.jit(lambda a, t: label_images(a, t, text, jnp.asarray([[64, 64]], jnp.int32), plan))(*batched)
    return jax.tree.map(lambda a: np.asarray(a)[0], out)


def _region(label, name, margin=2):
    y0, y1, x0, x1 = RECTS[name]
    return label[y0 + margin:y1 - margin, x0 + margin:x1 - margin]


@pytest.mark.parametrize("pooling", ["bilinear", "area"])
def test_constructed_segments_get_their_classes_and_paint_order(pooling):
    out = _constructed_case(pooling=pooling)
    assert out["seg_label"].tolist() == [1, 3, 2, 0]
    assert out["seg_best"][3] in (1, 2, 3) and abs(out["seg_similarity"][3]) < 0.1  # null region: cosine ~0
    label = out["label"]
    assert np.all(_region(label, "small_corner") == 3)  # smaller on top of the larger mask
    big = _region(label, "big_top").copy()
    big[:14, :14] = 1  # the corner's footprint inside big_top (checked above)
    assert np.all(big == 1)
    assert np.all(_region(label, "bottom") == 2) and np.all(_region(label, "null") == 0)
    assert np.all(label[60:, :4] == 255)  # no segment: ignore
    areas = [(y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in RECTS.values()]
    np.testing.assert_allclose(out["area"], areas, rtol=0.1)
    assert np.abs(out["boxes"][2] - [6, 42, 29, 57]).max() <= 1  # XYXY, max inclusive


def test_paint_orders_and_uncovered_background():
    out = _constructed_case(paint_order="area_asc", uncovered="background")
    assert np.all(_region(out["label"], "small_corner") == 1)  # the larger mask painted last wins
    assert np.all(out["label"][60:, :4] == 0)
    # iou_asc: the higher predicted IoU on top; give the corner the lower IoU so the big mask covers it
    out = _constructed_case(paint_order="iou_asc", ious=(0.9, 0.1, 0.5, 0.5))
    assert np.all(_region(out["label"], "small_corner") == 1)
    out = _constructed_case(paint_order="iou_asc", ious=(0.1, 0.9, 0.5, 0.5))
    assert np.all(_region(out["label"], "small_corner") == 3)

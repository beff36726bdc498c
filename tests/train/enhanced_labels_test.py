"""The enhanced-label options of the ``zsp`` mode on constructed inputs: B (``fuse_labels``) and C
(``relabel_map``), pixel by pixel against their documented rules."""

from __future__ import annotations

import numpy as np

from zsp_jax.train.relabel import relabel_map
from zsp_jax.train.step import IGNORE, fuse_labels


def test_fusion_keeps_agreeing_or_unsure_pixels_and_takes_confident_predictions():
    y0 = np.array([[1, 1, 2, IGNORE, IGNORE, 3]])
    pred = np.array([[1, 4, 4, 5, 5, 3]])
    conf = np.array([[0.99, 0.99, 0.50, 0.99, 0.50, 0.10]])
    out = np.asarray(fuse_labels(y0, pred, conf, 0.95))
    #                 agree  confident  unsure  uncovered+confident  uncovered+unsure  agree+unsure
    expected = np.array([[1, 4, 2, 5, IGNORE, 3]])
    np.testing.assert_array_equal(out, expected)
    # At the threshold itself the prediction counts as confident.
    assert int(fuse_labels(np.array([2]), np.array([4]), np.array([0.95]), 0.95)[0]) == 4


def test_relabel_takes_the_majority_class_of_a_segment_only_above_the_vote():
    h, w = 4, 8
    big = np.zeros((h, w), bool)
    big[:, :6] = True                       # 24 pixels, zero-shot class 1
    small = np.zeros((h, w), bool)
    small[1:3, 4:8] = True                  # 8 pixels on top of it, zero-shot class 2
    pred = np.zeros((h, w), np.int64)
    pred[:, :4] = 3                         # the model says 3 on 16 of big's 24 pixels (2/3)
    pred[1:3, 4:8] = 2
    pred[1, 4] = 0
    out, changed = relabel_map(np.stack([small, big]), np.array([2, 1]), pred, num_classes=5, vote=0.6)
    assert changed == 1                     # big: 3 holds 2/3 >= 0.6 -> relabelled; small: 2 kept
    expected = np.full((h, w), 255, np.uint8)
    expected[big] = 3
    expected[small] = 2                     # the smaller segment is painted last
    np.testing.assert_array_equal(out, expected)
    out, changed = relabel_map(np.stack([small, big]), np.array([2, 1]), pred, num_classes=5, vote=0.7)
    assert changed == 0 and out[0, 0] == 1  # 2/3 < 0.7: big keeps its zero-shot class

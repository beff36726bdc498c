"""Point grids, crop boxes and size buckets against segment-anything's utils/amg.py."""

import numpy as np
import pytest
from segment_anything.utils import amg as ref_amg

from zsp_jax.amg.geometry import Bucket, crop_boxes, crop_plan, layer_point_grids, resize_longest_side_shape
from zsp_jax.amg.options import AmgOptions


@pytest.mark.parametrize("n,layers,factor", [(32, 0, 1), (16, 2, 2), (7, 1, 1), (10, 2, 3), (1, 0, 1)])
def test_point_grids_equal_reference(n, layers, factor):
    ours = layer_point_grids(n, layers, factor)
    ref = ref_amg.build_all_layer_point_grids(n, layers, factor)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (1024, 1024), (97, 1301), (2, 3), (640, 427)])
@pytest.mark.parametrize("layers,ratio", [(0, 512 / 1500), (1, 512 / 1500), (2, 0.5), (3, 0.1)])
def test_crop_boxes_equal_reference(hw, layers, ratio):
    ours = crop_boxes(hw, layers, ratio)
    ref = ref_amg.generate_crop_boxes(hw, layers, ratio)
    assert ours == ref


def test_buckets_bound_every_crop():
    """Each layer's canvas holds every crop of every image of the bucket, and the long-side bound holds."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(20, 1500, size=2))
        step = int(rng.choice([16, 64, 128]))
        ratio = float(rng.uniform(0.05, 0.6))
        bucket = Bucket.for_size((h, w), step)
        assert bucket.contains((h, w))
        for layer, (boxes, sizes) in enumerate(crop_plan((h, w), 2, ratio, 1024)):
            ch, cw = bucket.layer_canvas(layer, ratio)
            long_min = bucket.layer_min_long_side(layer, ratio)
            for (x0, y0, x1, y1), (rh, rw) in zip(boxes, sizes):
                assert y1 - y0 <= ch and x1 - x0 <= cw
                assert max(y1 - y0, x1 - x0) >= long_min
                assert (rh, rw) == resize_longest_side_shape(y1 - y0, x1 - x0, 1024)


def test_options_validate_like_the_reference():
    with pytest.raises(ValueError):
        AmgOptions(points_per_side=None)
    with pytest.raises(ValueError):
        AmgOptions(points_per_side=4, point_grids=[np.zeros((4, 2))])
    with pytest.raises(ValueError):
        AmgOptions(output_mode="png")
    with pytest.raises(ValueError):
        AmgOptions(points_per_side=None, point_grids=[np.full((3, 2), 0.5)], crop_n_layers=1)
    grids = [np.random.default_rng(0).random((5, 2)), np.random.default_rng(1).random((3, 2))]
    o = AmgOptions.from_reference_kwargs(point_grids=grids, crop_n_layers=1)
    assert hash(o) == hash(AmgOptions.from_reference_kwargs(point_grids=grids, crop_n_layers=1))
    for a, b in zip(o.layer_grids(), grids):
        np.testing.assert_array_equal(a, b)
    assert o.reference_kwargs()["points_per_side"] is None

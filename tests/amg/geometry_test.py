"""Point grids, crop boxes and size buckets against segment-anything's utils/amg.py."""

import numpy as np
import pytest
from segment_anything.utils import amg as ref_amg

from zsp_jax.amg.geometry import Bucket, crop_boxes, crop_plan, folder_buckets, layer_point_grids, merge_buckets
from zsp_jax.models.sam.transforms import resize_longest_side_shape
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


def _twenty_sizes(seed=0, largest=1024):
    rng = np.random.default_rng(seed)
    sizes = set()
    while len(sizes) < 20:
        long_side = int(rng.integers(largest // 3, largest + 1))
        short = int(long_side * rng.uniform(0.5, 1.0))
        sizes.add((short, long_side) if rng.random() < 0.6 else (long_side, short))
    return sorted(sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folder_buckets_merge_a_mixed_folder_into_few_programs(seed):
    """20 images of 20 sizes: at most 20 // 8 = 2 programs at min_images=8, every image inside its bucket (it keeps
    its size: the bucket only pads it), every bucket bounding its images' crops; min_images=1 keeps the padded
    sizes as they are."""
    sizes = _twenty_sizes(seed)
    table = folder_buckets(sizes, 64, 8, 1024)
    natural = {hw: Bucket.for_size(hw, 64) for hw in sizes}
    assert len(set(natural.values())) >= 10  # the folder really is mixed
    buckets = set(table.values())
    assert len(buckets) <= 2
    assert all(sum(table[hw] == b for hw in sizes) >= 8 for b in buckets)
    for hw, bucket in table.items():
        assert bucket.contains(hw)
        for layer, (boxes, _) in enumerate(crop_plan(hw, 1, 512 / 1500, 1024)):
            ch, cw = bucket.layer_canvas(layer, 512 / 1500)
            for x0, y0, x1, y1 in boxes:
                assert y1 - y0 <= ch and x1 - x0 <= cw
                assert max(y1 - y0, x1 - x0) >= bucket.layer_min_long_side(layer, 512 / 1500)
    assert folder_buckets(sizes, 64, 1, 1024) == natural
    assert folder_buckets(list(reversed(sizes)), 64, 8, 1024) == table  # the order of the images does not matter
    assert set(folder_buckets(sizes[:5], 64, 8, 1024).values()) == {merge_all(natural[hw] for hw in sizes[:5])}


def merge_all(buckets):
    buckets = list(buckets)
    out = buckets[0]
    for b in buckets[1:]:
        out = merge_buckets(out, b)
    return out


def test_folder_buckets_keep_large_groups_apart():
    """Buckets that already serve enough images keep their own programs; a lone odd size joins one of them."""
    sizes = [(480, 640)] * 10 + [(640, 480)] * 10 + [(500, 500)]
    table = folder_buckets(sizes, 64, 8, 1024)
    landscape, portrait, odd = (Bucket.for_size(hw, 64) for hw in ((480, 640), (640, 480), (500, 500)))
    assert len(set(table.values())) == 2 and table[(480, 640)] != table[(640, 480)]
    assert table[(500, 500)] in (table[(480, 640)], table[(640, 480)])
    assert {table[(480, 640)], table[(640, 480)]} in ({merge_buckets(landscape, odd), portrait},
                                                      {landscape, merge_buckets(portrait, odd)})

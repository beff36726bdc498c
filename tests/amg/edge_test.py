"""The crop-edge rule on constructed boxes, against segment-anything's is_box_near_crop_edge."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from segment_anything.utils import amg as ref_amg

from zsp_jax.amg.statistics import near_crop_edge


def test_crop_edge_rule_equals_reference():
    image_hw = (300, 400)
    crop = [180, 0, 400, 170]  # touches the image's top and right edges, not its left and bottom
    boxes = np.array([
        [50, 50, 100, 100],    # inside: kept
        [0, 50, 100, 100],     # x0 on the crop's left edge (an inner edge): dropped
        [20, 50, 100, 100],    # 20 px from it: still "near" (atol 20, inclusive)
        [21, 50, 100, 100],    # 21 px: kept
        [50, 0, 100, 100],     # on the crop's top edge, which is the image's: kept
        [50, 50, 219, 100],    # x1 at the crop's right edge = the image's right edge: kept
        [50, 50, 100, 169],    # y1 near the crop's bottom edge (an inner edge): dropped
        [50, 50, 100, 149],    # 21 px away: kept
        [0, 0, 0, 0],          # an empty mask's box sits on the inner left edge: dropped
    ])
    ours = np.asarray(jax.jit(near_crop_edge)(jnp.asarray(boxes), jnp.asarray(crop), jnp.asarray(image_hw)))
    ref = ref_amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, image_hw[1], image_hw[0]]).numpy()
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, [False, True, True, False, False, False, True, False, True])
    # The full-image crop of layer 0 drops nothing.
    full = [0, 0, image_hw[1], image_hw[0]]
    assert not np.asarray(near_crop_edge(jnp.asarray(boxes), jnp.asarray(full), jnp.asarray(image_hw))).any()

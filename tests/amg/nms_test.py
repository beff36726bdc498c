"""Box NMS: constructed cases with known answers, and torchvision's semantics (the stand-in) on random boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.ops.boxes import batched_nms

from zsp_jax.amg.nms import nms_numpy, nms_padded, threshold_below

_nms = jax.jit(nms_padded, static_argnums=(3, 4))


def _device(boxes, scores, thr, max_keep=16, valid=None):
    valid = np.ones(len(boxes), bool) if valid is None else valid
    keep, kv, count = _nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.asarray(valid),
                           thr, max_keep)
    return np.asarray(keep)[np.asarray(kv)].tolist(), int(count)


def test_known_answer():
    boxes = np.array([[0, 0, 10, 10],    # 0: score .9, kept
                      [1, 1, 11, 11],    # 1: IoU with 0 = 81/119 = .68 -> kept at .7, suppressed at .5
                      [0, 0, 10, 10.5],  # 2: IoU with 0 = .952 -> suppressed
                      [50, 50, 60, 60],  # 3: disjoint, kept
                      [0, 0, 0, 0],      # 4: empty (IoU NaN with the other empty one): kept
                      [0, 0, 0, 0]], np.float32)  # 5: kept as well
    scores = np.array([.9, .8, .85, .1, .05, .05])
    assert _device(boxes, scores, 0.7)[0] == [0, 1, 3, 4, 5]
    assert _device(boxes, scores, 0.5)[0] == [0, 3, 4, 5]
    assert nms_numpy(boxes, scores, 0.7).tolist() == [0, 1, 3, 4, 5]
    # Equal scores keep the input order (stable sort); invalid boxes neither survive nor suppress.
    assert _device(boxes[:3], np.ones(3), 0.7)[0] == [0, 1]
    assert _device(boxes[:3], np.ones(3), 0.7, valid=np.array([False, True, True]))[0] == [1]
    # Threshold 1.0 keeps everything (IoU is never > 1).
    assert _device(boxes, scores, 1.0)[0] == [0, 2, 1, 3, 4, 5]


def test_truncation_is_counted():
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(10)], np.float32)
    kept, count = _device(boxes, np.linspace(1, 0, 10), 0.7, max_keep=4)
    assert kept == [0, 1, 2, 3] and count == 5  # one more than fits: the caller warns


def test_threshold_compares_like_torchvision():
    """torchvision compares a float32 IoU with a double threshold: IoU 1/10 is > 0.1 there."""
    assert float(np.float32(1) / np.float32(10)) > 0.1  # the float32 ratio rounds up
    assert threshold_below(0.1) < np.float32(0.1) and threshold_below(0.5) == np.float32(0.5)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 1, 10]], np.float32)  # IoU = 10 / 100 exactly
    assert _device(boxes, np.array([1.0, 0.5]), 0.1)[0] == [0]
    assert nms_numpy(boxes, np.array([1.0, 0.5]), 0.1).tolist() == [0]


@pytest.mark.parametrize("seed", range(4))
def test_random_boxes_equal_torchvision_semantics(seed):
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 60, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    scores[::7] = scores[0]  # ties
    for thr in (0.3, 0.7, 0.95):
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(n), iou_threshold=thr)
        kept, count = _device(boxes, scores, thr, max_keep=n)
        assert kept == ref.tolist()
        assert count == len(ref)
        assert nms_numpy(boxes, scores, thr).tolist() == ref.tolist()

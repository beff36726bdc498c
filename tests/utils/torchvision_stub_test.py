"""The torchvision stand-in must have torchvision's semantics, or every SAM/AMG parity test is moot."""

import numpy as np
import torch
from PIL import Image

from zsp_jax.references import torchvision_stub


def _greedy_nms_numpy(boxes, scores, thresh):
    """Independent textbook NMS: highest score first, drop IoU > thresh."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x1, y1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x2, y2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_matches_textbook_algorithm():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 40
        xy = rng.uniform(0, 80, size=(n, 2))
        wh = rng.uniform(5, 40, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        scores = rng.uniform(size=n)
        scores[:5] = scores[5]  # ties are broken by index, as a stable sort does
        thresh = [0.3, 0.5, 0.7][trial % 3]
        ours = torchvision_stub._nms(torch.tensor(boxes), torch.tensor(scores), thresh).tolist()
        assert ours == _greedy_nms_numpy(boxes.tolist(), scores.tolist(), thresh)


def test_batched_nms_keeps_categories_apart():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision_stub._batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert torchvision_stub._batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]


def test_resize_is_pil_bilinear_with_hw_order():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out = torchvision_stub._resize(img, [12, 20])
    assert out.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((20, 12), Image.BILINEAR)))


def test_install_is_idempotent_and_serves_segment_anything():
    assert torchvision_stub.install()
    assert torchvision_stub.install()
    from segment_anything.utils.transforms import ResizeLongestSide

    out = ResizeLongestSide(64).apply_image(np.zeros((30, 50, 3), np.uint8))
    assert out.shape == (38, 64, 3)  # int(30 * 64/50 + 0.5) = 38


# Two boxes (found by a random search) whose IoU is 0.69999993 in float32 arithmetic and
# 0.70000001 in exact arithmetic: around the default NMS threshold the two disagree.
_STRADDLE = [[64.0, 74.0, 5378.0, 4400.0], [497.0, -561.0, 5307.0, 3864.0]]


def test_nms_computes_in_float32_like_torchvision():
    """torchvision's kernel computes IoU in the boxes' dtype and compares it as a double: for this
    pair float32 keeps both boxes, while a float64 computation (the old stand-in) suppresses one."""
    from zsp_jax.amg.nms import nms_numpy

    scores = torch.tensor([0.9, 0.8])
    keep = torchvision_stub._nms(torch.tensor(_STRADDLE, dtype=torch.float32), scores, 0.7).tolist()
    assert keep == [0, 1]
    assert torchvision_stub._nms(torch.tensor(_STRADDLE, dtype=torch.float64), scores, 0.7).tolist() == [0]
    assert nms_numpy(np.asarray(_STRADDLE), np.array([0.9, 0.8]), 0.7).tolist() == keep  # our NMS agrees


def test_batched_nms_per_category_path_equals_offset_trick():
    """Above 4,000 coordinates torchvision switches to per-category NMS; both paths keep the same boxes."""
    rng = np.random.default_rng(2)
    n = 1200
    xy = rng.uniform(0, 500, (n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(5, 80, (n, 2))], 1), dtype=torch.float32)
    scores = torch.tensor(rng.uniform(size=n), dtype=torch.float32)
    idxs = torch.tensor(rng.integers(0, 3, n))
    vanilla = torchvision_stub._batched_nms(boxes, scores, idxs, 0.5)
    trick = torchvision_stub._nms(boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None], scores, 0.5)
    assert len(vanilla) > 100
    assert vanilla.tolist() == trick.tolist()

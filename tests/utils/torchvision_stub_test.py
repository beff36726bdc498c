"""The torchvision stand-in must have torchvision's semantics, or every SAM/AMG parity test is moot."""

import numpy as np
import torch
from PIL import Image

from zsp_jax.testing import torchvision_stub


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

"""A minimal pure-torch stand-in for the parts of torchvision the references import.

No CPU build of torchvision exists for torch 2.13 on our machines (the wheel on PyPI
links libtorch_cuda and fails at import), yet segment-anything, open_clip and
gem_torch import it at module load. This module provides exactly what they use,
with torchvision's semantics:

* ``ops.boxes.batched_nms`` / ``ops.nms`` / ``ops.boxes.box_area``: greedy NMS over
  boxes sorted by descending score (stable), suppressing IoU > threshold, in the boxes'
  dtype with a double comparison (torchvision's CPU kernel), categories separated by the
  coordinate-offset trick (per-category NMS above 4,000 coordinates); areas without a +1.
* ``transforms.functional.resize`` / ``to_pil_image``: the PIL path (PIL's own
  bilinear/bicubic filter, which is what torchvision calls for PIL images).
* ``transforms.{Compose, Resize, CenterCrop, ToTensor, Normalize, InterpolationMode}``
  for GEM's image transform; the augmentation classes open_clip only names at import
  raise if they are ever used.

``install()`` puts the stand-in into ``sys.modules`` unless a working torchvision is
importable. It is for parity tests and benchmarks only; zsp_jax itself never needs it.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np


def _nms(boxes, scores, iou_threshold: float):
    """torchvision's CPU ``nms`` kernel (``ops/cpu/nms_kernel.cpp``), step for step.

    Areas, intersections and IoUs are computed in the boxes' own dtype (float32 for the
    ``boxes.float()`` segment-anything passes), and each IoU is compared with the threshold as
    a C++ double (``ovr > iou_threshold`` promotes the float), so an IoU that rounds to just
    above a float32-unrepresentable threshold is suppressed exactly as torchvision does.
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        xx1 = torch.maximum(x1[idx], x1)
        yy1 = torch.maximum(y1[idx], y1)
        xx2 = torch.minimum(x2[idx], x2)
        yy2 = torch.minimum(y2[idx], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[idx] + areas - inter)  # in the boxes' dtype, as the kernel's scalar_t
        suppressed |= iou.double() > float(iou_threshold)
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    """torchvision's ``batched_nms`` on CPU: the coordinate-offset trick (offsets in the boxes' dtype)
    up to 4,000 box coordinates, per-category NMS above that, as ``ops/boxes.py`` chooses."""
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() > 4000:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for cat in torch.unique(idxs):
            where = torch.where(idxs == cat)[0]
            keep_mask[where[_nms(boxes[where], scores[where], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True, stable=True)[1]]
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _pil_filter(mode):
    from PIL import Image

    mode = InterpolationMode(getattr(mode, "value", mode))
    return {
        InterpolationMode.NEAREST: Image.NEAREST,
        InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC,
    }[mode]


def _to_pil_image(pic, mode=None):
    from PIL import Image

    if not isinstance(pic, np.ndarray):
        pic = pic.detach().cpu().numpy()
        if pic.ndim == 3:
            pic = np.transpose(pic, (1, 2, 0))
        if pic.dtype != np.uint8:
            pic = (pic * 255).astype(np.uint8)
    return Image.fromarray(pic, mode=mode)


def _resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """PIL path of torchvision's resize. ``size`` is [h, w] or the short side."""
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        w, h = img.size
        if w <= h:
            size = [int(short * h / w), short]
        else:
            size = [short, int(short * w / h)]
    return img.resize((size[1], size[0]), _pil_filter(interpolation))


def _center_crop(img, output_size):
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    th, tw = output_size
    w, h = img.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        return _resize(img, self.size, self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        return _center_crop(img, self.size)


class ToTensor:
    def __call__(self, pic):
        import torch

        arr = np.asarray(pic.convert("RGB") if hasattr(pic, "convert") else pic)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 255.0


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, t):
        import torch

        mean = torch.as_tensor(self.mean, dtype=t.dtype)[:, None, None]
        std = torch.as_tensor(self.std, dtype=t.dtype)[:, None, None]
        return (t - mean) / std


class _Unavailable:
    """Named at import by open_clip; the stand-in does not implement it."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"torchvision stand-in: {type(self).__name__} is not implemented")


def _unavailable(name):
    return type(name, (_Unavailable,), {})


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__zsp_jax_stub__ = True
    return mod


def install() -> bool:
    """Registers the stand-in in ``sys.modules``. Returns False if a real torchvision works."""
    if "torchvision" in sys.modules:
        return getattr(sys.modules["torchvision"], "__zsp_jax_stub__", False)
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision.ops  # noqa: F401

            return False
        except Exception:  # the CUDA-only wheel fails here; fall back to the stand-in
            for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                del sys.modules[key]
    # transformers caches whether torchvision is available the first time it asks; ask now,
    # before the stand-in exists, so that it never routes image processing through it.
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    boxes = _module("torchvision.ops.boxes", batched_nms=_batched_nms, nms=_nms, box_area=_box_area)
    misc = _module("torchvision.ops.misc", FrozenBatchNorm2d=_unavailable("FrozenBatchNorm2d"))
    ops = _module("torchvision.ops", boxes=boxes, misc=misc, batched_nms=_batched_nms, nms=_nms,
                  box_area=_box_area)
    functional = _module("torchvision.transforms.functional", resize=_resize, to_pil_image=_to_pil_image,
                         center_crop=_center_crop, InterpolationMode=InterpolationMode)
    transforms = _module(
        "torchvision.transforms", functional=functional, Compose=Compose, Resize=Resize,
        CenterCrop=CenterCrop, ToTensor=ToTensor, Normalize=Normalize, InterpolationMode=InterpolationMode,
        **{n: _unavailable(n) for n in ("RandomResizedCrop", "ColorJitter", "Grayscale", "RandomCrop",
                                         "RandomHorizontalFlip", "RandomApply", "RandomGrayscale")})
    root = _module("torchvision", ops=ops, transforms=transforms, __version__="0.0.0+zsp_jax_stub")
    sys.modules.update({
        "torchvision": root, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
        "torchvision.ops.misc": misc, "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    })
    return True

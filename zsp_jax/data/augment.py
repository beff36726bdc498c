"""UniMatch's augmentations on the host, with the reference's exact semantics (PIL, uint8).

Reference: UniMatch ``dataset/semi.py`` and ``dataset/transform.py`` (read, not copied).

Weak (labelled and unlabelled images; runs in the Grain workers):
  1. resize: long side L' = randint(int(0.5 L), int(2.0 L)) (inclusive), aspect kept with +0.5
     rounding; image bilinear (PIL, which low-pass filters when shrinking), mask nearest.
  2. crop: pad right/bottom to ``size`` (image 0, labelled mask 255, unlabelled padding marked
     in the ignore mask), then a uniform random ``size x size`` crop.
  An unlabelled image's pseudo-label map (``unlabeled_weak_view``) goes through the same resize
  (nearest), crop and flip as the image.
  3. horizontal flip with p = 0.5.

Strong (each of the two strong views of an unlabelled image, independently):
  * with p 0.8 torchvision ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` on a PIL image: factors
    b, c, s ~ U(0.5, 1.5), h ~ U(-0.25, 0.25), applied in a random order (a permutation of
    brightness, contrast, saturation, hue); each op is PIL's ``ImageEnhance``/HSV code with uint8
    results, exactly what torchvision runs on PIL images;
  * grayscale with p 0.2 (PIL ``convert('L')``, replicated to 3 channels);
  * Gaussian blur with p 0.5, sigma ~ U(0.1, 2.0) (PIL ``GaussianBlur(radius=sigma)``);
  * a CutMix box with p 0.5: area U(0.02, 0.4) of the crop, aspect U(0.3, 1/0.3),
    w = int(sqrt(area / ratio)), h = int(sqrt(area * ratio)), top-left resampled with the ratio
    until the box fits.

``zsp_jax.data.device_augment`` implements the strong part as a batched JAX function; the
parameter layout ``StrongParams`` is shared so that tests can apply the same draws both ways.
Random numbers come from a ``numpy.random.Generator`` (Grain's per-element generator), not from
Python's ``random`` as in the reference: same distributions, reproducible per element.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from zsp_jax.data.decode import IGNORE_LABEL

SCALE_RANGE = (0.5, 2.0)
PAD_MARK = 254  # the reference pads unlabelled masks with 254 and turns it into the ignore mask
JITTER_P, GRAY_P, BLUR_P, CUTMIX_P = 0.8, 0.2, 0.5, 0.5
JITTER = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
SIGMA_RANGE = (0.1, 2.0)
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_RATIO = (0.3, 1 / 0.3)
# Order indices of the colour ops inside StrongParams.order (torchvision's fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------- weak


def rescale_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(oh, ow) with the long side set to ``long_side`` and the aspect ratio kept (+0.5 rounding)."""
    if h > w:
        return long_side, int(1.0 * w * long_side / h + 0.5)
    return int(1.0 * h * long_side / w + 0.5), long_side


def sample_long_side(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float] = SCALE_RANGE) -> int:
    lo, hi = int(max(h, w) * scale[0]), int(max(h, w) * scale[1])
    return int(rng.integers(lo, hi + 1))


def resize(image: np.ndarray, mask: np.ndarray | None, oh: int, ow: int) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL bilinear resize of the uint8 image (H, W, 3) and nearest resize of the uint8 mask (H, W)."""
    img = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((ow, oh), Image.NEAREST))
    return img, mask


def pad_crop(image: np.ndarray, mask: np.ndarray, size: int, mask_fill: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pads right/bottom to ``size`` (image 0, mask ``mask_fill``) then crops ``size x size`` at a uniform
    random offset (both ends inclusive, as ``random.randint``)."""
    h, w = mask.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=mask_fill)
        h, w = mask.shape
    x = int(rng.integers(0, w - size + 1))
    y = int(rng.integers(0, h - size + 1))
    return image[y:y + size, x:x + size], mask[y:y + size, x:x + size]


def weak_view(image: np.ndarray, mask: np.ndarray | None, size: int, rng: np.random.Generator, *,
              mask_fill: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Resize, crop with padding, flip.

    Args:
      image: uint8 (H, W, 3).
      mask: uint8 (H, W) class indices (a labelled mask, or a pseudo-label map); None for an
        unlabelled image without labels.
      size: crop size S.
      rng: the element's generator.
      mask_fill: the value the mask is padded with (255 = ignore for labelled masks; see
        ``unlabeled_weak_view`` for the reference's 254 padding mark).

    Returns:
      image uint8 (S, S, 3) and, with a mask, the mask uint8 (S, S) padded with ``mask_fill``;
      without one, the ignore mask uint8 (S, S): 255 on padding, 0 elsewhere.
    """
    h, w = image.shape[:2]
    oh, ow = rescale_size(h, w, sample_long_side(h, w, rng))
    carrier = mask if mask is not None else np.zeros((h, w), np.uint8)
    image, carrier = resize(image, carrier, oh, ow)
    image, carrier = pad_crop(image, carrier, size, mask_fill, rng)
    if rng.random() < 0.5:
        image, carrier = image[:, ::-1], carrier[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(carrier)


def unlabeled_weak_view(image: np.ndarray, pseudo_label: np.ndarray | None, size: int, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The weak view of an unlabelled image and (if given) of its pseudo-label map, geometrically aligned.

    As the reference, the map is padded with ``PAD_MARK`` (254, never a class index: labels are
    < num_classes <= 81 or 255), resized nearest, cropped and flipped with the image; the
    padding becomes the ignore mask, so "padding" (ignore_mask 255) stays distinct from
    "uncovered" (pseudo label 255) and the random draws are those of ``weak_view(image, None)``.

    Returns:
      (image uint8 (S, S, 3), ignore_mask uint8 (S, S) with 255 on padding else 0,
      pseudo label uint8 (S, S) with 255 on padding and uncovered pixels, or None).
    """
    carrier = pseudo_label if pseudo_label is not None else np.zeros(image.shape[:2], np.uint8)
    img, carrier = weak_view(image, carrier, size, rng, mask_fill=PAD_MARK)
    padding = carrier == PAD_MARK
    ignore = np.where(padding, IGNORE_LABEL, 0).astype(np.uint8)
    label = np.where(padding, IGNORE_LABEL, carrier).astype(np.uint8) if pseudo_label is not None else None
    return img, ignore, label


# -------------------------------------------------------------------------------------------- strong


@dataclasses.dataclass
class StrongParams:
    """The random draws of one strong view (all plain numbers; arrays of them for a batch).

    jitter: apply ColorJitter; order: permutation of (brightness, contrast, saturation, hue);
    factors: (b, c, s, h) float32; gray: convert to grayscale; blur: apply Gaussian blur;
    sigma: blur sigma; box: (y, x, h, w) of the CutMix box, h = w = 0 for no box.
    """

    jitter: bool
    order: np.ndarray
    factors: np.ndarray
    gray: bool
    blur: bool
    sigma: float
    box: np.ndarray


def sample_cutmix_box(size: int, rng: np.random.Generator, p: float = CUTMIX_P) -> np.ndarray:
    """(y, x, h, w) int32 of a CutMix box in a ``size x size`` crop; all zeros (no box) with prob 1 - p.

    The reference's loop: area first, then (ratio, x, y) resampled together until the box fits.
    """
    if rng.random() > p:
        return np.zeros(4, np.int32)
    area = rng.uniform(*CUTMIX_AREA) * size * size
    while True:
        ratio = rng.uniform(*CUTMIX_RATIO)
        bw, bh = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + bw <= size and y + bh <= size:
            return np.array([y, x, bh, bw], np.int32)


def box_mask(box: np.ndarray, size: int) -> np.ndarray:
    """uint8 (S, S): 1 inside the (y, x, h, w) box, 0 elsewhere."""
    out = np.zeros((size, size), np.uint8)
    y, x, h, w = (int(v) for v in box)
    out[y:y + h, x:x + w] = 1
    return out


def sample_strong_params(size: int, rng: np.random.Generator) -> StrongParams:
    """Draws one strong view's parameters in the reference's order of events."""
    jitter = bool(rng.random() < JITTER_P)
    order = rng.permutation(4).astype(np.int32)
    b, c, s, h = JITTER
    factors = np.array([rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s),
                        rng.uniform(-h, h)], np.float32)
    gray = bool(rng.random() < GRAY_P)
    blur = bool(rng.random() < BLUR_P)
    sigma = float(np.float32(rng.uniform(*SIGMA_RANGE)))
    box = sample_cutmix_box(size, rng)
    return StrongParams(jitter, order, factors, gray, blur, sigma, box)


def hue_shift(hue: float) -> int:
    """The uint8 hue offset torchvision adds: ``np.array(hue * 255).astype(np.uint8)`` (truncate, wrap)."""
    return int(np.trunc(np.float64(hue) * 255)) % 256


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: shift H of PIL's uint8 HSV by ``hue * 255`` modulo 256."""
    h, s, v = img.convert("HSV").split()
    np_h = (np.asarray(h, np.uint8).astype(np.int32) + hue_shift(hue)) % 256
    return Image.merge("HSV", (Image.fromarray(np_h.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_op(img: Image.Image, op: int, factor: float) -> Image.Image:
    if op == BRIGHTNESS:
        return ImageEnhance.Brightness(img).enhance(factor)
    if op == CONTRAST:
        return ImageEnhance.Contrast(img).enhance(factor)
    if op == SATURATION:
        return ImageEnhance.Color(img).enhance(factor)
    return adjust_hue(img, factor)


def apply_strong(image: np.ndarray, params: StrongParams) -> np.ndarray:
    """ColorJitter / grayscale / blur of one uint8 (S, S, 3) image with explicit ``params`` (PIL)."""
    img = Image.fromarray(image)
    if params.jitter:
        for op in params.order:
            img = color_op(img, int(op), float(params.factors[op]))
    if params.gray:
        gray = np.asarray(img.convert("L"))
        img = Image.fromarray(np.repeat(gray[..., None], 3, -1))
    if params.blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=params.sigma))
    return np.asarray(img)


def strong_view(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One strong view of a weak uint8 (S, S, 3) crop: (image uint8 (S, S, 3), cutmix box uint8 (S, S))."""
    params = sample_strong_params(image.shape[0], rng)
    return apply_strong(image, params), box_mask(params.box, image.shape[0])


# ----------------------------------------------------------------------------------------- normalise

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std`` (ImageNet statistics, as ``ToTensor`` + ``Normalize``)."""
    return ((image.astype(np.float32) / 255.0) - MEAN) / STD

"""GEM's image transform: bicubic resize to 448x448 (aspect ratio not kept), scale to [0, 1],
normalise with OpenAI CLIP's mean/std. Output NHWC float32.

Two implementations with the same result:

* ``gem_preprocess``: host-side, one image of any size, through PIL exactly as the reference
  (``torchvision.transforms.Resize(BICUBIC)`` on a PIL image calls ``PIL.Image.resize``).
* ``gem_preprocess_batch``: on device, jittable, a batch of same-size uint8 images. It
  reproduces PIL's 8-bit bicubic resize bit for bit: PIL computes the antialiased a=-0.5
  cubic weights in double precision, rounds them to 22-bit fixed point, resizes horizontally
  then vertically, and rounds/clips to uint8 after each pass; we do the same integer
  arithmetic with int32 matrix products (see ``zsp_jax.utils.resize``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.models.clip.config import GEM_IMAGE_SIZE
from zsp_jax.utils.resize import antialias_bicubic_matrix

# OpenAI CLIP's image normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit resampling


def normalize(images: Any) -> Any:
    """(..., 3) float images in [0, 1] -> CLIP-normalised, float32 (numpy in, numpy out)."""
    xp = jnp if isinstance(images, jax.Array) else np
    mean = xp.asarray(OPENAI_MEAN, xp.float32)
    std = xp.asarray(OPENAI_STD, xp.float32)
    return (images.astype(xp.float32) - mean) / std


def gem_preprocess(image: Any, size: tuple[int, int] = GEM_IMAGE_SIZE) -> np.ndarray:
    """One image -> (h, w, 3) float32, exactly GEM's ``get_gem_img_transform``.

    Args:
      image: a PIL image or an (H, W, 3) uint8 array (RGB).
      size: output (height, width); GEM's default 448x448.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return normalize(np.asarray(image, np.float32) / np.float32(255.0))


def _fixed_point_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PIL's 22-bit fixed-point (out, in) resampling weights (round half away from zero)."""
    w = antialias_bicubic_matrix(in_size, out_size) * (1 << _PRECISION_BITS)
    return np.where(w < 0, np.trunc(w - 0.5), np.trunc(w + 0.5)).astype(np.int32)


def _pil_pass(x: jax.Array, m: np.ndarray, axis: str) -> jax.Array:
    k = jnp.asarray(m)
    spec = "oh,bhwc->bowc" if axis == "h" else "ow,bhwc->bhoc"
    acc = jnp.einsum(spec, k, x.astype(jnp.int32), preferred_element_type=jnp.int32)
    acc = acc + (1 << (_PRECISION_BITS - 1))
    return jnp.clip(jnp.right_shift(acc, _PRECISION_BITS), 0, 255).astype(jnp.uint8)


def pil_resize_bicubic(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) uint8 -> (B, h, w, C) uint8, bit-identical to PIL's ``resize(BICUBIC)``."""
    _, h, w, _ = images.shape
    out_h, out_w = size
    x = images
    if out_w != w:  # PIL: horizontal pass first
        x = _pil_pass(x, _fixed_point_matrix(w, out_w), "w")
    if out_h != h:
        x = _pil_pass(x, _fixed_point_matrix(h, out_h), "h")
    return x


def gem_preprocess_batch(images: jax.Array, size: tuple[int, int] = GEM_IMAGE_SIZE) -> jax.Array:
    """(B, H, W, 3) uint8 RGB -> (B, h, w, 3) float32 normalised, on device; equals ``gem_preprocess``.

    Jittable (``size`` static); shard ``images`` over the batch axis.
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = pil_resize_bicubic(images, size)
    return normalize(x.astype(jnp.float32) / jnp.float32(255.0))

"""SAM's pre- and post-processing: resize the longest side, normalise, pad; upsample and crop logits.

Equal to segment-anything's ``ResizeLongestSide`` + ``Sam.preprocess`` + ``Sam.postprocess_masks``:

* ``preprocess`` resizes with **PIL's bilinear filter** on the uint8 image, which is what the
  reference runs (``torchvision.transforms.functional.resize(to_pil_image(image), size)``
  takes the PIL path for PIL images). PIL is the reference's own resampler, so the result is
  bit-identical; it runs on the host (data loaders do this anyway).
* ``preprocess_jax`` is a jit-friendly device version (``jax.image.resize`` with an
  antialiased triangle filter, the filter PIL uses, in two rounded passes like PIL's); it
  differs from the reference by at most one grey level on a small fraction of pixels (PIL's
  fixed-point weights) and is meant for throughput pipelines (tests/sam/transforms_test.py
  states the measured fraction).
* ``postprocess_masks`` matches ``F.interpolate(mode="bilinear", align_corners=False)``:
  ``jax.image.resize(method="linear", antialias=False)`` samples at the same half-pixel
  positions with the same edge clamping, and like torch does not antialias when it
  downsamples. Sizes are static Python ints, so it jits without host round trips.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.models.sam.config import PIXEL_MEAN, PIXEL_STD

MASK_THRESHOLD = 0.0


def resize_longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side = ``target``, rounded as the reference does (int(x*scale + 0.5))."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, target: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3), longest side ``target``, PIL bilinear (the reference's resampler)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = resize_longest_side_shape(image.shape[0], image.shape[1], target)
    if (h, w) == image.shape[:2]:
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def normalize_and_pad(resized: np.ndarray | jax.Array, image_size: int,
                      pixel_mean: Sequence[float] = PIXEL_MEAN, pixel_std: Sequence[float] = PIXEL_STD,
                      ) -> np.ndarray | jax.Array:
    """(h, w, 3) 0..255 values -> (image_size, image_size, 3) float32: (x - mean) / std, zeros bottom/right.

    Works on numpy (host) and jax arrays (jit-friendly; shapes are static).
    """
    xp = jnp if isinstance(resized, jax.Array) else np
    mean = xp.asarray(pixel_mean, dtype=xp.float32)
    std = xp.asarray(pixel_std, dtype=xp.float32)
    x = (resized.astype(xp.float32) - mean) / std
    h, w = x.shape[:2]
    if h > image_size or w > image_size:
        raise ValueError(f"image of {h}x{w} does not fit into {image_size}x{image_size}")
    return xp.pad(x, ((0, image_size - h), (0, image_size - w), (0, 0)))


def preprocess(image: np.ndarray, image_size: int = 1024, pixel_mean: Sequence[float] = PIXEL_MEAN,
               pixel_std: Sequence[float] = PIXEL_STD) -> tuple[np.ndarray, tuple[int, int]]:
    """A uint8 RGB image -> the encoder input, exactly as segment-anything's SamPredictor.set_image.

    Args:
      image: uint8 (H, W, 3) RGB, values 0..255.
      image_size: S, the encoder's input side (``config.image_size``).

    Returns:
      (input (S, S, 3) float32 normalised and zero-padded, input_size (h, w) of the resized
      image inside it).
    """
    resized = resize_image(image, image_size)
    return normalize_and_pad(resized, image_size, pixel_mean, pixel_std), resized.shape[:2]


def preprocess_jax(image: jax.Array, image_size: int = 1024, pixel_mean: Sequence[float] = PIXEL_MEAN,
                   pixel_std: Sequence[float] = PIXEL_STD) -> jax.Array:
    """Device version of ``preprocess`` for jitted pipelines (static input shape).

    Args:
      image: (H, W, 3) uint8 or float 0..255.

    Returns:
      (S, S, 3) float32. Resampling follows PIL's bilinear filter: an antialiased triangle
      kernel, applied horizontally then vertically with the intermediate rounded to integers
      (half up), as PIL does for 8-bit images. PIL's fixed-point weights can still move a
      value that lies on a rounding boundary by one grey level.
    """
    h, w = resize_longest_side_shape(image.shape[0], image.shape[1], image_size)
    x = image.astype(jnp.float32)
    if w != image.shape[1]:
        x = jax.image.resize(x, (x.shape[0], w, 3), method="linear", antialias=True)
        x = jnp.clip(jnp.floor(x + 0.5), 0, 255)
    if h != image.shape[0]:
        x = jax.image.resize(x, (h, w, 3), method="linear", antialias=True)
        x = jnp.clip(jnp.floor(x + 0.5), 0, 255)
    return normalize_and_pad(x, image_size, pixel_mean, pixel_std)


def apply_coords(coords: np.ndarray | jax.Array, original_size: tuple[int, int], target: int
                 ) -> np.ndarray | jax.Array:
    """(..., 2) (x, y) pixel coordinates of the original image -> the resized-input frame, float32.

    Numpy inputs are scaled in float64 and then cast, as the reference's predictor does.
    """
    old_h, old_w = original_size
    new_h, new_w = resize_longest_side_shape(old_h, old_w, target)
    scale = np.array([new_w / old_w, new_h / old_h])
    if isinstance(coords, jax.Array):
        return coords.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
    return (np.asarray(coords, np.float64) * scale).astype(np.float32)


def apply_boxes(boxes: np.ndarray | jax.Array, original_size: tuple[int, int], target: int
                ) -> np.ndarray | jax.Array:
    """(..., 4) XYXY boxes of the original image -> the resized-input frame, float32."""
    shape = boxes.shape
    return apply_coords(boxes.reshape(shape[:-1] + (2, 2)), original_size, target).reshape(shape)


def postprocess_masks(low_res_logits: jax.Array, input_size: tuple[int, int], original_size: tuple[int, int],
                      image_size: int = 1024) -> jax.Array:
    """Low-resolution logits -> logits at the original image size (threshold at 0.0 for masks).

    Args:
      low_res_logits: (..., s, s) (s = image_size / 4, 256 for SAM).
      input_size: static (h, w) of the resized image inside the padded input.
      original_size: static (H, W) of the original image.
      image_size: static S, the padded input side.

    Returns:
      (..., H, W) float32: bilinear (align_corners=False) to S x S, crop to (h, w), bilinear to (H, W).
    """
    lead = low_res_logits.shape[:-2]
    x = low_res_logits.astype(jnp.float32)
    x = jax.image.resize(x, lead + (image_size, image_size), method="linear", antialias=False)
    x = x[..., : input_size[0], : input_size[1]]
    if tuple(original_size) != tuple(input_size):
        x = jax.image.resize(x, lead + tuple(original_size), method="linear", antialias=False)
    return x

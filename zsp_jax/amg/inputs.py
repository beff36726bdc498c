"""Input preparation of the mask generator: host crops and resizes, the device's normalisation.

``prepare_inputs`` does on the host what segment-anything's ``SamPredictor.set_image`` does per
crop: cut the crop, resize its longest side to the encoder's input size with PIL (the reference's
own resampler, so bit-identical), normalise and pad. With ``as_uint8=True`` it stops before the
normalisation and sends the uint8 crops (a quarter of the bytes); ``encoder_input`` normalises
them on the device, equal to the host's arithmetic bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.amg.geometry import crop_boxes, crop_plan
from zsp_jax.amg.plan import Plan


class AmgInputs(NamedTuple):
    """Device inputs for B images (see ``prepare_inputs``).

    Attributes:
      images: per layer, (B, C_i, S, S, 3) encoder inputs of the crops: float32 normalised and
        zero-padded (as ``zsp_jax.models.sam.transforms.preprocess``), or uint8 resized crops at
        the top-left of the S x S canvas, normalised on device (``encoder_input``: the same float32
        arithmetic, a quarter of the bytes to transfer).
      crop_boxes: per layer, (B, C_i, 4) int32 XYXY crop boxes in the image frame.
      input_hw: per layer, (B, C_i, 2) int32 size of each resized crop inside its S x S input.
      image_hw: (B, 2) int32 original image sizes (H, W); all within the plan's bucket.
    """

    images: tuple[jax.Array, ...]
    crop_boxes: tuple[jax.Array, ...]
    input_hw: tuple[jax.Array, ...]
    image_hw: jax.Array


def prepare_inputs(images: Sequence[np.ndarray], plan: Plan, *, as_uint8: bool = False) -> AmgInputs:
    """Host preprocessing of B images for ``generate_padded``: crops, PIL resize, normalise, pad.

    Args:
      images: B uint8 (H, W, 3) RGB images, all inside ``plan.bucket``.
      as_uint8: leave the resized crops as uint8 on a zero canvas; the device normalises them
        (``encoder_input``, bit-identical), which transfers a quarter of the bytes.

    Returns:
      ``AmgInputs`` of numpy arrays.
    """
    from zsp_jax.models.sam.transforms import normalize_and_pad, resize_image

    o = plan.options
    s = plan.image_size
    layers_imgs, layers_boxes, layers_hw = [], [], []
    for im in images:
        boxes = np.asarray(crop_boxes(im.shape[:2], o.crop_n_layers, o.crop_overlap_ratio)[0])
        if np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1]):
            # The reference fails here too (an empty crop cannot be resized).
            raise ValueError(f"image of size {im.shape[:2]} is too small for crop_n_layers={o.crop_n_layers}: "
                             "a crop would be empty")
    per_image = [crop_plan(im.shape[:2], o.crop_n_layers, o.crop_overlap_ratio, s) for im in images]
    for li in range(o.crop_n_layers + 1):
        imgs = np.zeros((len(images), plan.layers[li].n_crops, s, s, 3), np.uint8 if as_uint8 else np.float32)
        for bi, (im, layers) in enumerate(zip(images, per_image)):
            boxes, sizes = layers[li]
            for ci, (x0, y0, x1, y1) in enumerate(boxes):
                resized = resize_image(np.ascontiguousarray(im[y0:y1, x0:x1]), s)
                if resized.shape[:2] != tuple(sizes[ci]):
                    raise AssertionError("resized crop size differs from ResizeLongestSide's")
                if as_uint8:
                    imgs[bi, ci, : resized.shape[0], : resized.shape[1]] = resized
                else:
                    imgs[bi, ci] = normalize_and_pad(resized, s)
        layers_imgs.append(imgs)
        layers_boxes.append(np.stack([layers[li][0] for layers in per_image]).astype(np.int32))
        layers_hw.append(np.stack([layers[li][1] for layers in per_image]).astype(np.int32))
    image_hw = np.asarray([im.shape[:2] for im in images], np.int32)
    return AmgInputs(tuple(layers_imgs), tuple(layers_boxes), tuple(layers_hw), image_hw)


def abstract_inputs(plan: Plan, batch: int, sharding: Any = None) -> AmgInputs:
    """``AmgInputs`` of ``jax.ShapeDtypeStruct`` for ``batch`` images with uint8 crops (for ahead-of-time
    compilation), each leaf with ``sharding`` (e.g. the batch axis over the mesh's "data" axis)."""
    s = plan.image_size

    def leaf(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return AmgInputs(tuple(leaf((batch, layer.n_crops, s, s, 3), jnp.uint8) for layer in plan.layers),
                     tuple(leaf((batch, layer.n_crops, 4), jnp.int32) for layer in plan.layers),
                     tuple(leaf((batch, layer.n_crops, 2), jnp.int32) for layer in plan.layers),
                     leaf((batch, 2), jnp.int32))


def encoder_input(images: jax.Array, input_hw: jax.Array, image_size: int) -> jax.Array:
    """(B, S, S, 3) crops -> float32 SAM encoder input; uint8 crops are normalised here.

    uint8 input is the PIL-resized crop at the top-left of the canvas (anything else is ignored):
    ``(x - pixel_mean) / pixel_std`` inside the (h', w') of ``input_hw`` (B, 2), 0 outside, looked
    up from a table of the host's own ``normalize_and_pad`` arithmetic (``zsp_jax.utils.lut``), so
    equal to it bit for bit. Float input is returned as it is.
    """
    if images.dtype != jnp.uint8:
        return images
    from zsp_jax.models.sam.transforms import normalize_and_pad
    from zsp_jax.utils.lut import apply_uint8_table, uint8_table

    table = uint8_table(lambda v: normalize_and_pad(v[:, None], 256)[:, 0])
    x = apply_uint8_table(images, table)
    s = jnp.arange(image_size)
    inside = (s[None, :, None] < input_hw[:, 0, None, None]) & (s[None, None, :] < input_hw[:, 1, None, None])
    return jnp.where(inside[..., None], x, 0.0)

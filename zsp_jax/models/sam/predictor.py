"""Interactive use: embed an image once, then decode any number of prompts in one jitted call.

``SamPredictor`` follows segment-anything's ``SamPredictor`` (same argument conventions and
results), with two differences: prompts are batched (N prompts of P points each, or N boxes,
decoded in one call), and N is rounded up to a power of two ("bucketing") so that a session
with varying prompt counts compiles a handful of programs instead of one per count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.sam import transforms
from zsp_jax.models.sam.model import Sam


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class SamPredictor:
    """Embed once with ``set_image``, then ``predict`` points / boxes / mask inputs, batched.

    Args:
      model: a ``Sam`` (e.g. from ``load_sam``).
      bucket_prompts: pad the prompt count to a power of two to limit recompilation.
    """

    def __init__(self, model: Sam, *, bucket_prompts: bool = True):
        self.model = model
        self.config = model.config
        self.bucket_prompts = bucket_prompts
        graphdef, self._state = nnx.split(model)
        s = self.config.image_size

        def embed(state: Any, images: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).embed(images)

        def decode(state: Any, features: jax.Array, coords: Any, labels: Any, boxes: Any, masks: Any, *,
                   multimask_output: bool, input_size: tuple[int, int], original_size: tuple[int, int],
                   return_logits: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
            low, iou = nnx.merge(graphdef, state).decode(features, coords, labels, boxes, masks,
                                                          multimask_output=multimask_output)
            full = transforms.postprocess_masks(low[0], input_size, original_size, s)
            return (full if return_logits else full > transforms.MASK_THRESHOLD), iou[0], low[0]

        self._embed = jax.jit(embed)
        self._decode = jax.jit(decode, static_argnames=("multimask_output", "input_size", "original_size",
                                                        "return_logits"))
        self.reset_image()

    def reset_image(self) -> None:
        self.features: jax.Array | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of a uint8 (H, W, 3) image (RGB, or BGR with ``image_format="BGR"``)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image_format == "BGR":
            image = image[..., ::-1]
        c = self.config
        x, input_size = transforms.preprocess(np.ascontiguousarray(image), c.image_size, c.pixel_mean, c.pixel_std)
        self.features = self._embed(self._state, jnp.asarray(x)[None])
        self.original_size = tuple(int(v) for v in image.shape[:2])
        self.input_size = tuple(int(v) for v in input_size)

    def get_image_embedding(self) -> jax.Array:
        """(1, g, g, prompt_dim) embedding of the current image (NHWC)."""
        if not self.is_image_set:
            raise RuntimeError("call set_image(...) before get_image_embedding()")
        return self.features

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the current image, in original-image pixel coordinates.

        Args:
          point_coords: (P, 2) (x, y) for one prompt, or (N, P, 2) for N prompts.
          point_labels: (P,) or (N, P): 1 foreground, 0 background, -1 ignored.
          box: (4,) XYXY for one prompt, or (N, 4).
          mask_input: (1, s, s) or (N, 1, s, s) low-resolution logits from an earlier call
            (s = image_size / 4, 256 for SAM).
          multimask_output: three masks per prompt (True) or one.
          return_logits: return logits instead of boolean masks.

        Returns:
          masks (N, K, H, W) bool (or float32 logits), iou_predictions (N, K) float32 and
          low_res_logits (N, K, s, s) float32, as numpy arrays; N is dropped when the prompts
          were given unbatched (as the reference predictor does).
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(...) before predict()")
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        c = self.config
        unbatched = (point_coords is not None and np.ndim(point_coords) == 2) or \
                    (box is not None and np.ndim(box) == 1) or (mask_input is not None and np.ndim(mask_input) == 3)
        coords = labels = boxes = masks = None
        if point_coords is not None:
            coords = transforms.apply_coords(np.asarray(point_coords), self.original_size, c.image_size)
            labels = np.asarray(point_labels, np.int32)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
        if box is not None:
            boxes = transforms.apply_boxes(np.asarray(box, np.float64), self.original_size, c.image_size).reshape(-1, 4)
        if mask_input is not None:
            masks = np.asarray(mask_input, np.float32)
            masks = (masks[None] if masks.ndim == 3 else masks).transpose(0, 2, 3, 1)  # (N, s, s, 1)
        n = next(len(x) for x in (coords, boxes, masks) if x is not None)
        nb = _bucket(n) if self.bucket_prompts else n

        def prep(x: np.ndarray | None) -> jax.Array | None:
            if x is None:
                return None
            if len(x) != n:
                raise ValueError(f"prompt arrays disagree on the number of prompts: {len(x)} vs {n}")
            if nb > n:
                x = np.concatenate([x, np.repeat(x[:1], nb - n, axis=0)])
            return jnp.asarray(x)[None]

        out = self._decode(self._state, self.features, prep(coords), prep(labels), prep(boxes), prep(masks),
                           multimask_output=bool(multimask_output), input_size=self.input_size,
                           original_size=self.original_size, return_logits=bool(return_logits))
        full, iou, low = (np.asarray(x)[:n] for x in out)
        if unbatched:
            full, iou, low = full[0], iou[0], low[0]
        return full, iou, low

"""Segment Anything (SAM) in Flax NNX: vit_b / vit_l / vit_h, converted from the official checkpoints.

Public API (NHWC throughout; S = ``config.image_size``, g = S/16, s = 4g):

* ``SamConfig.vit_b() / vit_l() / vit_h() / tiny(image_size=256)``: frozen architecture configs.
* ``Sam(config, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention="auto")``:
  - ``embed(images (B, S, S, 3) normalised + padded) -> (B, g, g, 256)``;
  - ``decode(embeddings (B, g, g, 256), point_coords (B, N, P, 2) | None, point_labels (B, N, P) | None,
    boxes (B, N, 4) | None = None, mask_inputs (B, N, s, s, 1) | None = None, *, multimask_output)
    -> (low_res_logits (B, N, K, s, s), iou_predictions (B, N, K))`` with K = 3 or 1.
  Both are jit-friendly: ``graphdef, state = nnx.split(sam)`` and ``jax.jit`` a function that
  calls ``nnx.merge(graphdef, state).embed(images)``, with the batch sharded over a mesh.
* ``transforms``: ``resize_longest_side_shape``, ``preprocess`` (host, PIL, equal to the
  reference), ``preprocess_jax`` (device), ``apply_coords``, ``apply_boxes``, ``postprocess_masks``.
* ``load_sam(path, dtype=..., param_dtype=..., attention=...) -> (Sam, SamConfig)`` from a file written by
  ``tools/convert_sam.py`` (no torch needed); ``convert_checkpoint`` / ``convert_sam_state_dict``.
* ``SamPredictor``: ``set_image`` once, ``predict`` batched points / boxes / masks.
"""

from zsp_jax.models.sam import transforms
from zsp_jax.models.sam.config import VARIANTS, SamConfig
from zsp_jax.models.sam.convert import (
                                        convert_checkpoint,
                                        convert_sam_state_dict,
                                        from_state_dict,
                                        infer_config,
                                        load_sam,
                                        sam_rules,
)
from zsp_jax.models.sam.model import MASK_THRESHOLD, Sam
from zsp_jax.models.sam.predictor import SamPredictor
from zsp_jax.models.sam.transforms import (
                                        apply_boxes,
                                        apply_coords,
                                        postprocess_masks,
                                        preprocess,
                                        preprocess_jax,
                                        resize_longest_side_shape,
)

__all__ = [
    "MASK_THRESHOLD", "VARIANTS", "Sam", "SamConfig", "SamPredictor", "apply_boxes", "apply_coords",
    "convert_checkpoint", "convert_sam_state_dict", "from_state_dict", "infer_config", "load_sam",
    "postprocess_masks", "preprocess", "preprocess_jax", "resize_longest_side_shape", "sam_rules", "transforms",
]

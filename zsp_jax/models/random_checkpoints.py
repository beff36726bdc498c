"""Random-weight checkpoint files of the tiny SAM and CLIP models, for the smoke default.

``configs/smoke.py`` runs the whole method on a generated dataset without any downloaded weights:
``tiny_checkpoints(dir)`` writes converted ``.safetensors`` files (no torch needed), the format the
labeller loads directly. ``random_weight_label_config()`` gives the ``label`` settings under which
such models still keep many segments and several classes (with random weights the default AMG
filters keep nothing): no IoU / stability filter, stability offset 0.05, no NMS.

The PyTorch-format counterparts (a segment-anything ``.pth`` and an open_clip state_dict, what users
of the originals have) are written by ``zsp_jax.references.checkpoints`` (needs torch).
"""

from __future__ import annotations

import os

from zsp_jax.utils import weights

CLIP_SIZE = 64  # the tiny CLIP (patch 8) sees an 8 x 8 feature grid


def tiny_checkpoints(directory: str, *, seed: int = 0, sam_image_size: int = 256) -> tuple[str, str]:
    """(SAM .safetensors, CLIP .safetensors) of ``SamConfig.tiny`` / ``ClipConfig.tiny`` with random weights.

    Existing files are kept (the smoke run calls this on every start)."""
    from flax import nnx

    from zsp_jax.models.clip import ClipConfig, ClipModel
    from zsp_jax.models.clip.convert import ConvertedClip, save_clip
    from zsp_jax.models.sam import Sam, SamConfig
    from zsp_jax.models.sam.convert import metadata

    os.makedirs(directory, exist_ok=True)
    sam_path = os.path.join(directory, "sam_tiny.safetensors")
    clip_path = os.path.join(directory, "clip_tiny.safetensors")
    # numpy-drawn weights, not the models' initialisers (why: build_with_random_weights' docstring)
    if not os.path.exists(sam_path):
        sam = weights.build_with_random_weights(lambda: Sam(SamConfig.tiny(image_size=sam_image_size),
                                                            rngs=nnx.Rngs(seed)), seed)
        weights.save_weights(sam_path, weights.flat_weights(sam), metadata(sam.config, "random"))
    if not os.path.exists(clip_path):
        clip = weights.build_with_random_weights(lambda: ClipModel(ClipConfig.tiny(), seed=seed), seed + 1)
        save_clip(clip_path, ConvertedClip(clip.config, weights.flat_weights(clip), "open_clip", "random"))
    return sam_path, clip_path


def random_weight_label_config():
    """``label`` settings (a ConfigDict) under which the tiny random-weight models keep many segments."""
    from zsp_jax.label.options import default_label_config

    c = default_label_config()
    c.clip_size = CLIP_SIZE
    c.gem_depth = 3  # the tiny CLIP has 3 vision blocks: GEM on the last 2
    c.amg.points_per_side = 8
    c.amg.pred_iou_thresh = 0.0
    c.amg.stability_score_thresh = 0.0
    c.amg.stability_score_offset = 0.05
    c.amg.box_nms_thresh = 1.0
    c.amg.max_masks = 192  # 64 points x 3 masks: nothing is truncated
    c.threshold = 0.02
    return c

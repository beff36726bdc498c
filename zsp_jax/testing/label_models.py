"""Small random-weight SAM and CLIP checkpoint files for labeller tests and the smoke run.

``tiny_checkpoints(dir)`` writes converted ``.safetensors`` files (no torch needed), the format
the labeller loads directly; ``pytorch_checkpoints(dir)`` writes the files users of the PyTorch
originals have (a segment-anything ``.pth`` state_dict and an open_clip state_dict), which the
labeller converts on first use (needs torch).
"""

from __future__ import annotations

import os

from zsp_jax.utils import weights as W


def tiny_checkpoints(directory: str, *, seed: int = 0, sam_image_size: int = 256) -> tuple[str, str]:
    """(SAM .safetensors, CLIP .safetensors) of ``SamConfig.tiny`` / ``ClipConfig.tiny`` with random weights."""
    from flax import nnx

    from zsp_jax.models.clip import ClipConfig, ClipModel
    from zsp_jax.models.clip.convert import ConvertedClip, save_clip
    from zsp_jax.models.sam import Sam, SamConfig
    from zsp_jax.models.sam.convert import metadata

    os.makedirs(directory, exist_ok=True)
    sam_path = os.path.join(directory, "sam_tiny.safetensors")
    clip_path = os.path.join(directory, "clip_tiny.safetensors")
    if not os.path.exists(sam_path):
        sam = Sam(SamConfig.tiny(image_size=sam_image_size), rngs=nnx.Rngs(seed))
        W.save_weights(sam_path, W.flat_weights(sam), metadata(sam.config, "random"))
    if not os.path.exists(clip_path):
        clip = ClipModel(ClipConfig.tiny(), seed=seed)
        save_clip(clip_path, ConvertedClip(clip.config, W.flat_weights(clip), "open_clip", "random"))
    return sam_path, clip_path


def pytorch_checkpoints(directory: str, *, seed: int = 0, sam_image_size: int = 256) -> tuple[str, str]:
    """(segment-anything .pth, open_clip .bin) state_dicts of tiny random models (needs torch)."""
    import torch

    from zsp_jax.models.sam import SamConfig
    from zsp_jax.testing.clip import tiny_open_clip
    from zsp_jax.testing.sam import reference_sam

    os.makedirs(directory, exist_ok=True)
    sam_path = os.path.join(directory, "sam_tiny.pth")
    clip_path = os.path.join(directory, "open_clip_tiny.bin")
    if not os.path.exists(sam_path):
        torch.save(reference_sam(SamConfig.tiny(image_size=sam_image_size), seed=seed).state_dict(), sam_path)
    if not os.path.exists(clip_path):
        torch.save(tiny_open_clip(quick_gelu=True, seed=seed).state_dict(), clip_path)
    return sam_path, clip_path


CLIP_SIZE = 64  # the tiny CLIP (patch 8) sees an 8 x 8 feature grid


def many_segments_config():
    """``label`` settings under which random-weight models keep many segments and several classes
    (``environment.md`` section 7): no IoU / stability filter, stability offset 0.05, no NMS."""
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


def make_options(config=None, classes: str = "voc"):
    """``LabelOptions`` of ``config`` (default ``many_segments_config()``) and a class list."""
    from zsp_jax.label.classes import load_classes
    from zsp_jax.label.options import LabelOptions

    return LabelOptions.from_config(config if config is not None else many_segments_config(), load_classes(classes))

"""PyTorch-format random checkpoints of the tiny SAM and CLIP models (needs torch).

The files users of the originals have: a segment-anything ``.pth`` state_dict and an open_clip
state_dict, which the labeller converts on first use. Their converted counterparts, which need no
torch, are written by ``zsp_jax.models.random_checkpoints``.
"""

from __future__ import annotations

import os


def pytorch_checkpoints(directory: str, *, seed: int = 0, sam_image_size: int = 256) -> tuple[str, str]:
    """(segment-anything .pth, open_clip .bin) state_dicts of tiny random models."""
    import torch

    from zsp_jax.models.sam import SamConfig
    from zsp_jax.references.clip import tiny_open_clip
    from zsp_jax.references.sam import reference_sam

    os.makedirs(directory, exist_ok=True)
    sam_path = os.path.join(directory, "sam_tiny.pth")
    clip_path = os.path.join(directory, "open_clip_tiny.bin")
    if not os.path.exists(sam_path):
        torch.save(reference_sam(SamConfig.tiny(image_size=sam_image_size), seed=seed).state_dict(), sam_path)
    if not os.path.exists(clip_path):
        torch.save(tiny_open_clip(quick_gelu=True, seed=seed).state_dict(), clip_path)
    return sam_path, clip_path

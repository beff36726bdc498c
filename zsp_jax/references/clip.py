"""PyTorch references for the CLIP / GEM parity tests and ``tools/bench_clip.py``.

The GEM reference is the ``gem`` package (gem-torch 1.0.1) on an open_clip model. gem-torch
was written for open_clip <= 2.23, whose transformer blocks took sequence-first (LND) input.
open_clip >= 2.24 builds its ``nn.MultiheadAttention`` layers with ``batch_first=True``, while
GEM's ``modified_vit_forward`` still permutes the tokens to LND before the blocks: the blocks
GEM leaves untouched then attend across the *batch* instead of across tokens (with one image
they attend over a single token). ``gem_reference`` restores the layout those blocks had under
open_clip 2.23 (``batch_first=False`` on their attention), which is the only change to the
reference. GEM's own ``SelfSelfAttention`` blocks transpose explicitly and are unaffected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zsp_jax.references import torchvision_stub
from zsp_jax.references.torch_utils import randomize_

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
               "tv monitor")

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")


def random_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(B, H, W, 3) float32 standard normal: the statistics of CLIP-normalised images."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def open_clip_model(vision: dict[str, Any], text: dict[str, Any], embed_dim: int, *, quick_gelu: bool,
                    seed: int = 0, custom_text: bool = False) -> Any:
    """An open_clip ``CLIP`` with every parameter randomised (``randomize_``), in eval mode."""
    torchvision_stub.install()
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text), quick_gelu=quick_gelu).eval()
    # open_clip's only buffer is the causal mask (0 / -inf), which randomize_ leaves alone.
    return randomize_(model, seed=seed)


def tiny_open_clip(*, quick_gelu: bool = True, seed: int = 0, custom_text: bool = False) -> Any:
    """A 3+2-layer open_clip CLIP at 32x32 with 8x8 patches (heads = width / 64, OpenAI's rule)."""
    return open_clip_model(dict(layers=3, width=128, patch_size=8, image_size=32),
                           dict(context_length=77, width=64, heads=1, layers=2), 16,
                           quick_gelu=quick_gelu, seed=seed, custom_text=custom_text)


def open_clip_vit_b16(*, quick_gelu: bool = True, seed: int = 0) -> Any:
    """A randomised open_clip ViT-B/16 (``ViT-B-16-quickgelu`` shapes, as OpenAI's ViT-B/16)."""
    return open_clip_model(dict(layers=12, width=768, patch_size=16, image_size=224),
                           dict(context_length=77, width=512, heads=8, layers=12), 512,
                           quick_gelu=quick_gelu, seed=seed)


def gem_reference(model: Any, *, depth: int = 7, ss_attn_iter: int = 1, ss_attn_temp: float | None = None) -> Any:
    """gem's ``GEMWrapper`` around a copy of ``model`` (open_clip CLIP), fixed for open_clip >= 2.24.

    Returns the wrapper; ``gem_reference_features`` runs it.
    """
    torchvision_stub.install()
    import copy

    import gem
    from torch import nn

    wrapper = gem.GEMWrapper(copy.deepcopy(model), tokenizer=None, depth=depth, ss_attn_iter=ss_attn_iter,
                             ss_attn_temp=ss_attn_temp)
    for blk in wrapper.model.visual.transformer.resblocks:
        if isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
            blk.attn.batch_first = False  # the LND layout gem_utils.modified_vit_forward feeds them
    return wrapper.eval()


def gem_reference_features(wrapper: Any, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(feat_gem, feat_ori), each (B, 1 + gh*gw, D) float32 numpy, of GEM's vision forward."""
    import torch

    with torch.no_grad():
        feat_gem, feat_ori = wrapper.model.visual(torch.from_numpy(np.ascontiguousarray(
            images_nhwc.transpose(0, 3, 1, 2))).float())
    return feat_gem.numpy(), feat_ori.numpy()


def hf_clip_config(**overrides: Any) -> Any:
    """A tiny transformers ``CLIPConfig`` (4 heads of 16 in vision, 2 of 16 in text)."""
    from transformers import CLIPConfig

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
                  image_size=32, hidden_act="quick_gelu")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                hidden_act="quick_gelu")
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=overrides.pop("projection_dim", 16),
                      **overrides)


def hf_clip_model(config: Any, seed: int = 0) -> Any:
    """A randomised transformers ``CLIPModel`` in eval mode (eager attention, fp32)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return randomize_(model, seed=seed)

"""SAM hyper-parameters: one frozen dataclass, one named constructor per variant.

The numbers are those of segment-anything's ``build_sam.py`` (image size 1024, patch 16,
window 14, prompt dimension 256, two-way transformer of depth 2 with 8 heads and MLP 2048,
mask-input hidden channels 16, IoU head of depth 3 and width 256). ``tiny`` is a small
configuration for tests that the reference modules can be built with as well.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model.

    Attributes:
      name: variant name ("vit_b", "vit_l", "vit_h", "tiny" or "custom").
      image_size: side S of the square, padded encoder input; the embedding grid is S/patch_size.
      patch_size: ViT patch size.
      encoder_dim / encoder_depth / encoder_heads: ViT width, number of blocks and heads.
      global_attn_indexes: blocks with global attention; the others use windowed attention.
      window_size: side of the attention windows, in tokens.
      mlp_ratio: ViT MLP hidden width / encoder_dim.
      prompt_dim: channels of the image embedding, the prompt tokens and the decoder.
      mask_in_chans: hidden channels of the mask-input downscaling branch.
      decoder_depth / decoder_heads / decoder_mlp_dim: two-way transformer.
      attention_downsample_rate: internal width divisor of the decoder's cross-attentions.
      num_multimask_outputs: masks returned with multimask_output=True.
      iou_head_depth / iou_head_hidden_dim: IoU prediction MLP.
      pixel_mean / pixel_std: RGB normalisation on the 0..255 scale.
    """

    name: str = "vit_b"
    image_size: int = 1024
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} is not divisible by {self.encoder_heads} heads")
        if any(not 0 <= i < self.encoder_depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} outside 0..{self.encoder_depth - 1}")

    # ------------------------------------------------------------------ variants

    @classmethod
    def vit_b(cls, **overrides: Any) -> "SamConfig":
        """SAM ViT-B (91M parameters; ``sam_vit_b_01ec64.pth``)."""
        return cls(**{"name": "vit_b", **overrides})

    @classmethod
    def vit_l(cls, **overrides: Any) -> "SamConfig":
        """SAM ViT-L (308M parameters; ``sam_vit_l_0b3195.pth``)."""
        return cls(**{"name": "vit_l", "encoder_dim": 1024, "encoder_depth": 24, "encoder_heads": 16,
                      "global_attn_indexes": (5, 11, 17, 23), **overrides})

    @classmethod
    def vit_h(cls, **overrides: Any) -> "SamConfig":
        """SAM ViT-H (636M parameters; ``sam_vit_h_4b8939.pth``)."""
        return cls(**{"name": "vit_h", "encoder_dim": 1280, "encoder_depth": 32, "encoder_heads": 16,
                      "global_attn_indexes": (7, 15, 23, 31), **overrides})

    @classmethod
    def tiny(cls, image_size: int = 256, **overrides: Any) -> "SamConfig":
        """A small encoder for tests: 4 blocks of width 64, 2 heads, windows of 6 tokens.

        The embedding grid (image_size/16) is not a multiple of the window for the default
        256 (16 -> padded to 18), so the reference's window padding is exercised. The prompt
        encoder and mask decoder keep SAM's real sizes: they cost little at small image sizes.
        """
        return cls(**{"name": "tiny", "image_size": image_size, "encoder_dim": 64, "encoder_depth": 4,
                      "encoder_heads": 2, "global_attn_indexes": (1, 3), "window_size": 6, **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "SamConfig":
        """``"vit_b"`` / ``"vit_l"`` / ``"vit_h"`` / ``"tiny"`` -> config."""
        ctors = {"vit_b": cls.vit_b, "vit_l": cls.vit_l, "vit_h": cls.vit_h, "tiny": cls.tiny}
        if name not in ctors:
            raise ValueError(f"unknown SAM variant {name!r}; expected one of {sorted(ctors)}")
        return ctors[name](**overrides)

    # ------------------------------------------------------------------ derived sizes

    @property
    def grid_size(self) -> int:
        """Side of the image-embedding grid (64 for SAM at 1024)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4 x grid_size; 256 for SAM)."""
        return 4 * self.grid_size

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields {unknown}")
        for key in ("global_attn_indexes", "pixel_mean", "pixel_std"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' shapes (everything but the name)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        return d


VARIANTS = ("vit_b", "vit_l", "vit_h")

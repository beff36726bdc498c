"""Hyper-parameters of CLIP ViT models and of GEM, one table for the family."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Activation = Literal["gelu", "quick_gelu"]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A CLIP ViT: vision tower, text tower and joint embedding.

    ``act`` is the MLP activation of both towers: OpenAI's checkpoints (and transformers'
    ``openai/clip-*`` copies, and open_clip's ``-quickgelu`` / ``openai`` models) were trained
    with ``quick_gelu`` = x * sigmoid(1.702 x); open_clip's own (LAION) models use the exact
    erf ``gelu``. A wrong choice runs but gives wrong features, so converters take it from the
    checkpoint where it is recorded and otherwise from the format's convention.

    ``pos_embed_antialias`` selects how the vision positional embedding is resampled to the
    patch grid of another input size: ``True`` = bicubic with antialias (open_clip, GEM),
    ``False`` = plain bicubic (transformers' ``interpolate_pos_encoding``). Upsampling
    (224 -> 448, what GEM does) differs between the two as well: the kernels differ.
    """

    embed_dim: int = 512
    # vision tower
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    # text tower
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    # shared
    act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pos_embed_antialias: bool = True

    def __post_init__(self) -> None:
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        for name, width, heads in (("vision", self.vision_width, self.vision_heads),
                                   ("text", self.text_width, self.text_heads)):
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side at the training resolution (14 for ViT-B/16 at 224)."""
        return self.image_size // self.patch_size

    # ------------------------------------------------------------------ named variants
    @classmethod
    def vit_b32(cls, act: Activation = "quick_gelu") -> ClipConfig:
        return cls(patch_size=32, act=act)

    @classmethod
    def vit_b16(cls, act: Activation = "quick_gelu") -> ClipConfig:
        return cls(act=act)

    @classmethod
    def vit_l14(cls, act: Activation = "quick_gelu") -> ClipConfig:
        return cls(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                   vision_mlp_dim=4096, text_width=768, text_heads=12, text_mlp_dim=3072, act=act)

    @classmethod
    def vit_l14_336(cls, act: Activation = "quick_gelu") -> ClipConfig:
        return dataclasses.replace(cls.vit_l14(act), image_size=336)

    @classmethod
    def tiny(cls, act: Activation = "quick_gelu") -> ClipConfig:
        """A few-layer model for tests: 32x32 input, 8x8 patches, 64-d towers, 16-d joint space."""
        return cls(embed_dim=16, image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
                   vision_mlp_dim=128, context_length=77, text_width=32, text_layers=2, text_heads=2,
                   text_mlp_dim=64, act=act)

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClipConfig:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ClipConfig fields {sorted(unknown)} (file from a newer zsp_jax?)")
        return cls(**data)

    def variant_name(self) -> str:
        """``vit_b16`` etc. when the shapes are one of the named variants, else ``custom``."""
        for name in VARIANTS:
            ref = getattr(ClipConfig, name)(self.act)
            if dataclasses.replace(ref, pos_embed_antialias=self.pos_embed_antialias) == self:
                return name
        return "custom"


VARIANTS = ("vit_b32", "vit_b16", "vit_l14", "vit_l14_336")


@dataclasses.dataclass(frozen=True)
class GemConfig:
    """Options of the Grounding Everything Module (Bousselham et al., CVPR 2024).

    Defaults are those of the reference ``gem.create_gem_model``.

    Attributes:
      depth: GEM replaces the attention of the last ``depth - 1`` vision blocks (7 -> the last
        6). ``1`` means no GEM block: the dense features are CLIP's plain final tokens.
      ss_attn_iter: clustering iterations of the self-self attention before the final
        assignment to the values.
      ss_attn_temp: a fixed inverse temperature; ``None`` = GEM's adaptive one, the mean token
        norm of the block's LayerNorm output times head_dim^-0.5 (per image).
    """

    depth: int = 7
    ss_attn_iter: int = 1
    ss_attn_temp: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"GEM depth must be >= 1, got {self.depth}")
        if self.ss_attn_iter < 0:
            raise ValueError(f"ss_attn_iter must be >= 0, got {self.ss_attn_iter}")


GEM_IMAGE_SIZE = (448, 448)
"""GEM's default input resolution (height, width): ``gem.get_gem_img_transform``."""

"""Hyper-parameters of DINOv2 ViTs, one table for the family.

The numbers are DINOv2's (``dinov2/models/vision_transformer.py`` and ``dinov2/hub/backbones.py``,
the same in UniMatch V2's copy ``model/backbone/dinov2.py``): patch 14, positional embedding for
a 37 x 37 grid (518 px), LayerScale initialised at 1, LayerNorm eps 1e-6, biases on every linear
layer, MLP ratio 4 (GELU MLP for S/B/L, SwiGLU for g).

The "with registers" checkpoints (``dinov2_vit*14_reg4_pretrain.pth``) add 4 register tokens and
resample the positional embedding differently: ``interpolate_offset=0.0`` with
``interpolate_antialias=True``, where the originals use 0.1 without antialiasing (see
``Dinov2Config``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

Ffn = Literal["mlp", "swiglu"]

# name -> (embed_dim, depth, num_heads, ffn, UniMatch V2's intermediate_layer_idx)
_SIZES: dict[str, tuple[int, int, int, str, tuple[int, ...]]] = {
    "vit_s14": (384, 12, 6, "mlp", (2, 5, 8, 11)),
    "vit_b14": (768, 12, 12, "mlp", (2, 5, 8, 11)),
    "vit_l14": (1024, 24, 16, "mlp", (4, 11, 17, 23)),
    "vit_g14": (1536, 40, 24, "swiglu", (9, 19, 29, 39)),
}
REGISTER_SUFFIX = "_reg4"
VARIANTS: tuple[str, ...] = tuple(_SIZES) + tuple(n + REGISTER_SUFFIX for n in _SIZES)
"""Named variants: ``vit_{s,b,l,g}14`` and the with-registers ``vit_{s,b,l,g}14_reg4``."""

# UniMatch V2's encoder names (``DPT(encoder_size=...)``) and short letters.
ALIASES: dict[str, str] = {"small": "vit_s14", "base": "vit_b14", "large": "vit_l14", "giant": "vit_g14",
                           "s": "vit_s14", "b": "vit_b14", "l": "vit_l14", "g": "vit_g14"}


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """DINOv2's ``SwiGLUFFNFused`` width: int(2/3 * int(dim * ratio)) rounded up to a multiple of 8 (4096 for g)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Architecture of a DINOv2 ViT and how it resamples its positional embedding.

    Attributes:
      name: variant name (one of ``VARIANTS``, "tiny" or "custom").
      embed_dim / depth / num_heads: width, number of blocks and attention heads.
      mlp_ratio: FFN width / embed_dim before the SwiGLU rule (``ffn_hidden_dim``).
      ffn: "mlp" (fc1 -> exact GELU -> fc2) or "swiglu" (DINOv2's ``SwiGLUFFNFused``:
        silu(x W1) * (x W2) -> W3, hidden width ``swiglu_hidden_dim``).
      patch_size: 14.
      pos_grid: side of the square positional-embedding grid (37 = 518 / 14).
      num_register_tokens: 0, or 4 for the "_reg4" checkpoints; they sit after the class token.
      interpolate_offset: DINOv2's resampling of the positional embedding to a gh x gw grid.
        When > 0, ``F.interpolate(scale_factor=((gh + offset) / 37, (gw + offset) / 37))``: output
        size floor(37 * s) (which must equal the grid) and input coordinate ``(i + 0.5) / s - 0.5``.
        When 0 (registers checkpoints), ``size=(gh, gw)`` as the current DINOv2 code does (the
        older code, copied into UniMatch V2, passed ``scale_factor=g / 37`` also for 0, which fails
        its own size assertion for some grids, e.g. 39, because 37 * (39 / 37) floors to 38).
      interpolate_antialias: torch's ``antialias`` flag of that resize (True for registers).
      layer_scale_init: LayerScale init value (1.0 in every DINOv2 checkpoint); None = no
        LayerScale (``init_values=None`` in DINOv2, no ``ls1``/``ls2`` tensors).
      layer_norm_eps: 1e-6.
      intermediate_indices: the blocks whose outputs UniMatch V2's DPT head reads
        (``DPT.intermediate_layer_idx``): S/B 2, 5, 8, 11; L 4, 11, 17, 23; g 9, 19, 29, 39.
    """

    name: str = "vit_b14"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ffn: Ffn = "mlp"
    patch_size: int = 14
    pos_grid: int = 37
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_scale_init: float | None = 1.0
    layer_norm_eps: float = 1e-6
    intermediate_indices: tuple[int, ...] = (2, 5, 8, 11)

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_indices", tuple(int(i) for i in self.intermediate_indices))
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_register_tokens < 0 or self.interpolate_offset < 0:
            raise ValueError("num_register_tokens and interpolate_offset must be >= 0")
        bad = [i for i in self.intermediate_indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"intermediate_indices {bad} outside 0..{self.depth - 1}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def ffn_hidden_dim(self) -> int:
        """Hidden width of the FFN: dim * ratio for the MLP, ``swiglu_hidden_dim`` for SwiGLU."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        return swiglu_hidden_dim(self.embed_dim, self.mlp_ratio) if self.ffn == "swiglu" else hidden

    @property
    def pretrain_image_size(self) -> int:
        """518 for the released models: the image size whose patch grid is the embedding's."""
        return self.pos_grid * self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus registers, in front of the patch tokens."""
        return 1 + self.num_register_tokens

    # ------------------------------------------------------------------ named variants
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Dinov2Config:
        """``vit_b14`` / ``vit_b14_reg4`` / ... or UniMatch V2's ``small`` / ``base`` / ``large`` / ``giant``
        (also ``s`` / ``b`` / ``l`` / ``g``)."""
        key = ALIASES.get(name, name)
        base, registers = (key[: -len(REGISTER_SUFFIX)], True) if key.endswith(REGISTER_SUFFIX) else (key, False)
        if base not in _SIZES:
            raise ValueError(f"unknown DINOv2 variant {name!r}; expected one of {VARIANTS + tuple(ALIASES)}")
        dim, depth, heads, ffn, indices = _SIZES[base]
        fields: dict[str, Any] = dict(name=key, embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn,
                                      intermediate_indices=indices)
        if registers:
            fields.update(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
        return cls(**{**fields, **overrides})

    @classmethod
    def vit_s14(cls, registers: bool = False) -> Dinov2Config:
        """ViT-S/14 (21M parameters)."""
        return cls.from_name("vit_s14" + (REGISTER_SUFFIX if registers else ""))

    @classmethod
    def vit_b14(cls, registers: bool = False) -> Dinov2Config:
        """ViT-B/14 (86M parameters)."""
        return cls.from_name("vit_b14" + (REGISTER_SUFFIX if registers else ""))

    @classmethod
    def vit_l14(cls, registers: bool = False) -> Dinov2Config:
        """ViT-L/14 (300M parameters)."""
        return cls.from_name("vit_l14" + (REGISTER_SUFFIX if registers else ""))

    @classmethod
    def vit_g14(cls, registers: bool = False) -> Dinov2Config:
        """ViT-g/14 (1.1B parameters, SwiGLU FFN)."""
        return cls.from_name("vit_g14" + (REGISTER_SUFFIX if registers else ""))

    # UniMatch V2's encoder names (``DPT(encoder_size=...)``, ``backbone: dinov2_small``)
    @classmethod
    def small(cls, registers: bool = False, **overrides: Any) -> Dinov2Config:
        """``vit_s14`` (V2's ``small``)."""
        return cls.from_name("vit_s14" + (REGISTER_SUFFIX if registers else ""), **overrides)

    @classmethod
    def base(cls, registers: bool = False, **overrides: Any) -> Dinov2Config:
        """``vit_b14`` (V2's ``base``)."""
        return cls.from_name("vit_b14" + (REGISTER_SUFFIX if registers else ""), **overrides)

    @classmethod
    def large(cls, registers: bool = False, **overrides: Any) -> Dinov2Config:
        """``vit_l14`` (V2's ``large``)."""
        return cls.from_name("vit_l14" + (REGISTER_SUFFIX if registers else ""), **overrides)

    @classmethod
    def giant(cls, registers: bool = False, **overrides: Any) -> Dinov2Config:
        """``vit_g14`` (V2's ``giant``)."""
        return cls.from_name("vit_g14" + (REGISTER_SUFFIX if registers else ""), **overrides)

    @classmethod
    def tiny(cls, *, registers: int = 0, ffn: Ffn = "mlp", **overrides: Any) -> Dinov2Config:
        """A 4-block, 32-wide, 2-head model for tests, with the real 37 x 37 positional grid and patch 14.

        ``registers`` > 0 also selects the registers checkpoints' resampling (offset 0, antialias),
        as ``from_name("..._reg4")``; pass ``interpolate_offset`` / ``_antialias`` to choose.
        """
        fields: dict[str, Any] = dict(name="tiny", embed_dim=32, depth=4, num_heads=2, ffn=ffn,
                                      num_register_tokens=registers, intermediate_indices=(0, 1, 2, 3))
        if registers:
            fields.update(interpolate_offset=0.0, interpolate_antialias=True)
        return cls(**{**fields, **overrides})

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Dinov2Config:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Dinov2Config fields {sorted(unknown)} (file from a newer zsp_jax?)")
        return cls(**data)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' shapes (what a checkpoint can tell)."""
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, ffn=self.ffn,
                    ffn_hidden_dim=self.ffn_hidden_dim, patch_size=self.patch_size, pos_grid=self.pos_grid,
                    num_register_tokens=self.num_register_tokens, layer_scale=self.layer_scale_init is not None)

    def variant_name(self) -> str:
        """The named variant with this architecture (``vit_b14``, ``vit_b14_reg4``, ...), else ``custom``."""
        for name in VARIANTS:
            if Dinov2Config.from_name(name).architecture() == self.architecture():
                return name
        return "custom"


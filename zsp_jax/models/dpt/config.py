"""Hyper-parameters of UniMatch V2's DPT head and of the full segmenter (DINOv2 encoder + DPT head).

Values from UniMatch V2 (LiheYoung/UniMatch-V2 at f6afb4df): ``unimatch_v2.py``'s
``model_configs`` (head width ``features`` and per-level ``out_channels`` per encoder size) and
``model/semseg/dpt.py`` (blocks whose outputs feed the head: S/B 2, 5, 8, 11; L 4, 11, 17, 23;
g 9, 19, 29, 39; patch 14; ``use_bn=False``). ``configs/*.yaml`` choose the encoder
(``backbone: dinov2_small`` in every shipped config, base for the README's results), the number
of classes (21 VOC, 19 Cityscapes, 150 ADE20K, 81 COCO) and ``lock_backbone`` (True for ADE20K).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

ENCODER_SIZES = ("small", "base", "large", "giant")
# unimatch_v2.py model_configs: (features, out_channels)
HEAD_WIDTHS = {
    "small": (64, (48, 96, 192, 384)),
    "base": (128, (96, 192, 384, 768)),
    "large": (256, (256, 512, 1024, 1024)),
    "giant": (384, (1536, 1536, 1536, 1536)),
}
# DINOv2 ViT-S/B/L/g widths (model/backbone/dinov2.py), the head's input channels
ENCODER_EMBED_DIMS = {"small": 384, "base": 768, "large": 1024, "giant": 1536}
# dpt.py DPT.intermediate_layer_idx
INTERMEDIATE_INDICES = {
    "small": (2, 5, 8, 11),
    "base": (2, 5, 8, 11),
    "large": (4, 11, 17, 23),
    "giant": (9, 19, 29, 39),
}
PATCH_SIZE = 14


@dataclasses.dataclass(frozen=True)
class DptHeadConfig:
    """DPT head hyper-parameters.

    Attributes:
      num_classes: output channels of the last 1x1 conv.
      embed_dim: channels of the encoder's token maps (DINOv2's width: 384 / 768 / 1024 / 1536).
      features: width of the scratch convs, fusion blocks and output conv (V2's ``features``).
      out_channels: widths of the four per-level 1x1 projections (V2's ``out_channels``); levels
        0 and 1 are upsampled 4x / 2x by transposed convs, level 3 downsampled 2x.
      use_bn: V2's ``use_bn``, False in every V2 model; True (BatchNorm in the residual units)
        is refused: it is never used and would need train/eval state in the head.
    """

    num_classes: int = 21
    embed_dim: int = 768
    features: int = 128
    out_channels: tuple[int, int, int, int] = HEAD_WIDTHS["base"][1]
    use_bn: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_channels", tuple(int(c) for c in self.out_channels))
        if len(self.out_channels) != 4:
            raise ValueError(f"out_channels needs 4 widths, got {self.out_channels}")
        if self.use_bn:
            raise ValueError("use_bn=True is not supported: UniMatch V2 builds its DPT head with use_bn=False")
        if min(self.num_classes, self.embed_dim, self.features, *self.out_channels) < 1:
            raise ValueError(f"widths must be positive: {self}")

    @classmethod
    def for_encoder(cls, encoder_size: str, num_classes: int = 21) -> DptHeadConfig:
        """V2's head for a DINOv2 ``encoder_size`` (``small``, ``base``, ``large``, ``giant``)."""
        if encoder_size not in HEAD_WIDTHS:
            raise ValueError(f"encoder_size must be one of {ENCODER_SIZES}, got {encoder_size!r}")
        features, out_channels = HEAD_WIDTHS[encoder_size]
        return cls(num_classes=num_classes, embed_dim=ENCODER_EMBED_DIMS[encoder_size], features=features,
                   out_channels=out_channels)

    @classmethod
    def tiny(cls, **kw: Any) -> DptHeadConfig:
        """The real graph with few channels, for quick tests."""
        return cls(**{"num_classes": 5, "embed_dim": 16, "features": 8, "out_channels": (4, 6, 8, 12), **kw})

    @property
    def encoder_size(self) -> str | None:
        """The V2 encoder size whose head this is (``small`` ..), or None for other widths."""
        for size, (features, out_channels) in HEAD_WIDTHS.items():
            if (self.features, self.out_channels, self.embed_dim) == (features, out_channels,
                                                                       ENCODER_EMBED_DIMS[size]):
                return size
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> DptHeadConfig:
        return dataclasses.replace(self, **kw)


def _dinov2_config_class() -> Any:
    from zsp_jax.models.dinov2.config import Dinov2Config  # imported late: the encoder family is optional for the head

    return Dinov2Config


@dataclasses.dataclass(frozen=True)
class DptConfig:
    """The full UniMatch V2 segmenter: a DINOv2 encoder and a DPT head.

    Attributes:
      encoder: the encoder's config (``zsp_jax.models.dinov2.Dinov2Config``, or any frozen
        dataclass with ``embed_dim``, ``patch_size`` and ``intermediate_indices`` for an injected
        encoder module); ``intermediate_indices`` are the 4 blocks whose normalised patch tokens
        feed the head (V2: S/B 2, 5, 8, 11, L 4, 11, 17, 23, g 9, 19, 29, 39).
      head: the DPT head; ``head.embed_dim`` must equal ``encoder.embed_dim``.
      lock_backbone: V2's ``lock_backbone`` (``configs/ade20k.yaml`` sets it): the encoder is
        frozen. The model then stops gradients at the encoder's outputs; a train step should
        also leave the encoder out of the optimiser (V2 gives its frozen parameters no optimiser
        group at all, so they get no weight decay either).
    """

    encoder: Any
    head: DptHeadConfig
    lock_backbone: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):
            object.__setattr__(self, "head", DptHeadConfig(**self.head))
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", _dinov2_config_class().from_json(json.dumps(self.encoder)))
        if self.head.embed_dim != self.encoder.embed_dim:
            raise ValueError(f"head.embed_dim {self.head.embed_dim} != encoder.embed_dim {self.encoder.embed_dim}")
        if len(tuple(self.encoder.intermediate_indices)) != 4:
            raise ValueError(f"the DPT head takes 4 encoder levels, the encoder config gives "
                             f"{self.encoder.intermediate_indices}")

    # ------------------------------------------------------------------ named constructors

    @classmethod
    def for_encoder(cls, encoder_size: str, num_classes: int = 21, *, lock_backbone: bool = False,
                    **encoder_kw: Any) -> DptConfig:
        """V2's model for a DINOv2 size (``unimatch_v2.py``: ``DPT(**model_configs[size], nclass=...)``)."""
        if encoder_size not in ENCODER_SIZES:
            raise ValueError(f"encoder_size must be one of {ENCODER_SIZES}, got {encoder_size!r}")
        encoder = _dinov2_config_class().from_name(encoder_size, **encoder_kw)
        return cls(encoder=encoder, head=DptHeadConfig.for_encoder(encoder_size, num_classes),
                   lock_backbone=lock_backbone)

    @classmethod
    def small(cls, num_classes: int = 21, **kw: Any) -> DptConfig:
        """DINOv2-S/14 + head 64 / (48, 96, 192, 384): the encoder of every shipped V2 config."""
        return cls.for_encoder("small", num_classes, **kw)

    @classmethod
    def base(cls, num_classes: int = 21, **kw: Any) -> DptConfig:
        """DINOv2-B/14 + head 128 / (96, 192, 384, 768): the README's results."""
        return cls.for_encoder("base", num_classes, **kw)

    @classmethod
    def large(cls, num_classes: int = 21, **kw: Any) -> DptConfig:
        """DINOv2-L/14 + head 256 / (256, 512, 1024, 1024)."""
        return cls.for_encoder("large", num_classes, **kw)

    @classmethod
    def giant(cls, num_classes: int = 21, **kw: Any) -> DptConfig:
        """DINOv2-g/14 (SwiGLU) + head 384 / (1536,) * 4."""
        return cls.for_encoder("giant", num_classes, **kw)

    @classmethod
    def tiny(cls, num_classes: int = 5, *, lock_backbone: bool = False, **head_kw: Any) -> DptConfig:
        """A tiny DINOv2 (``Dinov2Config.tiny()``: 4 blocks, 32 wide, all 4 feeding the head) with a
        tiny head, for quick tests."""
        encoder = _dinov2_config_class().tiny(intermediate_indices=(0, 1, 2, 3))
        head = DptHeadConfig.tiny(**{"num_classes": num_classes, "embed_dim": encoder.embed_dim, **head_kw})
        return cls(encoder=encoder, head=head, lock_backbone=lock_backbone)

    # ------------------------------------------------------------------ derived values

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_size)

    @property
    def intermediate_indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.encoder.intermediate_indices)

    @property
    def embed_dim(self) -> int:
        """Channels of the encoder features, the width of a complementary-dropout mask."""
        return self.head.embed_dim

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def variant(self) -> str:
        """``dinov2_small`` .. ``dinov2_giant`` (V2's ``backbone`` names) when encoder and head are V2's
        for that size, else ``custom``."""
        size = self.head.encoder_size
        name_of = getattr(self.encoder, "variant_name", None)
        if size is not None and name_of is not None:
            expected = _dinov2_config_class().from_name(size)
            if name_of() == expected.name and self.intermediate_indices == expected.intermediate_indices:
                return f"dinov2_{size}"
        return "custom"

    def to_json(self) -> str:
        return json.dumps({"encoder": dataclasses.asdict(self.encoder), "head": self.head.to_dict(),
                           "lock_backbone": self.lock_backbone}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DptConfig:
        return cls(**json.loads(text))

    def replace(self, **kw: Any) -> DptConfig:
        return dataclasses.replace(self, **kw)

"""Hyper-parameters of DeepLabV3+ and its backbones: one frozen dataclass, named constructors.

The real-size variants follow UniMatch (LiheYoung/UniMatch, ``configs/*.yaml`` and
``model/``): ResNet-50/101 with the deep stem (three 3x3 convs, 64-64-128) or the plain
torchvision stem (one 7x7 conv), Xception-65 for COCO, output stride 16, ASPP rates 6/12/18.
Widths are fields so that ``tiny_resnet()`` / ``tiny_xception()`` build the same graph
with few channels for quick tests.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# conv1, conv2, block1, block2, block3 (= middle width), block20, conv3/conv4, conv5 (= high-level channels)
XCEPTION65_WIDTHS = (32, 64, 128, 256, 728, 1024, 1536, 2048)
XCEPTION65_MIDDLE = 16
MULTI_GRID = (2, 2, 4)  # UniMatch's stage-4 dilation multipliers when multi_grid is set

# PyTorch BatchNorm momentum m updates r <- (1 - m) r + m x; Flax's convention is r <- m r + (1 - m) x.
TORCH_BN_MOMENTUM = 0.9  # torch default 0.1
XCEPTION_BN_MOMENTUM = 1.0 - 0.0003  # UniMatch's xception.py sets bn_mom = 0.0003


@dataclasses.dataclass(frozen=True)
class DeepLabConfig:
    """DeepLabV3+ hyper-parameters.

    Attributes:
      backbone: ``"resnet"`` or ``"xception"``.
      num_classes: output channels of the classifier (21 for PASCAL VOC, 81 for COCO, 19 Cityscapes).
      output_stride: ratio of input to high-level feature size: 16 (UniMatch) or 8 (32 for a
        ResNet without dilation).
      resnet_blocks: bottleneck blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
      resnet_stem: ``"deep"`` (UniMatch / ResNet-v1c: 3x3 convs 64-64-128) or ``"plain"``
        (torchvision: one 7x7 conv to 64).
      resnet_width: channels of the first stage's bottleneck (64 for the real models); stage i
        uses ``width * 2**i`` and outputs 4x that.
      resnet_multi_grid: UniMatch's ``multi_grid``: the three blocks of stage 4 multiply their
        dilation by (2, 2, 4). UniMatch sets it only for Cityscapes (with output stride 8 and
        ASPP rates 12/24/36, see ``cityscapes()``); PASCAL VOC and COCO use False. It changes
        no tensor shape, so a converter cannot read it from a checkpoint: set it explicitly.
      xception_widths: the 8 channel counts of Xception-65 (see ``XCEPTION65_WIDTHS``).
      xception_middle: number of middle-flow blocks (16 for Xception-65).
      aspp_rates: dilation rates of the three atrous ASPP branches.
      aspp_channels: ASPP width (UniMatch: high-level channels // 8 = 256).
      low_level_channels: width the low-level features are reduced to (48).
      decoder_channels: width of the two 3x3 decoder convs (256).
      bn_epsilon: BatchNorm epsilon (PyTorch default 1e-5).
      backbone_bn_momentum: Flax-convention momentum of the backbone's BatchNorms (None: 0.9
        for ResNet, 0.9997 for Xception as in UniMatch).
      head_bn_momentum: Flax-convention momentum of the head's BatchNorms (0.9 = torch 0.1).
      fp_dropout: channel-dropout rate of UniMatch's feature perturbation (0.5).
    """

    backbone: str = "resnet"
    num_classes: int = 21
    output_stride: int = 16
    resnet_blocks: tuple[int, ...] = RESNET_BLOCKS[101]
    resnet_stem: str = "deep"
    resnet_width: int = 64
    resnet_multi_grid: bool = False
    xception_widths: tuple[int, ...] = XCEPTION65_WIDTHS
    xception_middle: int = XCEPTION65_MIDDLE
    aspp_rates: tuple[int, int, int] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    bn_epsilon: float = 1e-5
    backbone_bn_momentum: float | None = None
    head_bn_momentum: float = TORCH_BN_MOMENTUM
    fp_dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet", "xception"):
            raise ValueError(f"backbone must be 'resnet' or 'xception', got {self.backbone!r}")
        if self.backbone == "resnet":
            if self.output_stride not in (8, 16, 32):
                raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {self.output_stride}")
            if self.resnet_stem not in ("deep", "plain"):
                raise ValueError(f"resnet_stem must be 'deep' or 'plain', got {self.resnet_stem!r}")
            if len(self.resnet_blocks) != 4:
                raise ValueError(f"resnet_blocks needs 4 stages, got {self.resnet_blocks}")
            if self.resnet_multi_grid and self.resnet_blocks[3] != len(MULTI_GRID):
                raise ValueError(f"resnet_multi_grid needs {len(MULTI_GRID)} blocks in stage 4, "
                                 f"got {self.resnet_blocks[3]}")
        elif self.resnet_multi_grid:
            raise ValueError("resnet_multi_grid applies to ResNet backbones only")
        if self.backbone == "xception":
            if self.output_stride not in (8, 16):
                raise ValueError(f"Xception output_stride must be 8 or 16, got {self.output_stride}")
            if len(self.xception_widths) != 8:
                raise ValueError(f"xception_widths needs 8 entries, got {self.xception_widths}")
        if len(self.aspp_rates) != 3:
            raise ValueError(f"aspp_rates needs 3 rates, got {self.aspp_rates}")
        # tuples, also when built from JSON lists
        for f in ("resnet_blocks", "xception_widths", "aspp_rates"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))

    # ------------------------------------------------------------------ named constructors

    @classmethod
    def resnet50(cls, *, stem: str = "deep", **kw: Any) -> DeepLabConfig:
        """DeepLabV3+ on ResNet-50 (``stem="deep"``: UniMatch's; ``"plain"``: torchvision's)."""
        return cls(backbone="resnet", resnet_blocks=RESNET_BLOCKS[50], resnet_stem=stem, **kw)

    @classmethod
    def resnet101(cls, *, stem: str = "deep", **kw: Any) -> DeepLabConfig:
        """DeepLabV3+ on ResNet-101, UniMatch's PASCAL VOC / Cityscapes model (59.5M parameters, 21 classes)."""
        return cls(backbone="resnet", resnet_blocks=RESNET_BLOCKS[101], resnet_stem=stem, **kw)

    @classmethod
    def cityscapes(cls, depth: int = 50, **kw: Any) -> DeepLabConfig:
        """UniMatch's Cityscapes model: ResNet-``depth`` (deep stem), output stride 8, multi-grid,
        ASPP rates 12/24/36, 19 classes (``configs/cityscapes.yaml``)."""
        kw = {"resnet_blocks": RESNET_BLOCKS[depth], "output_stride": 8, "resnet_multi_grid": True,
              "aspp_rates": (12, 24, 36), "num_classes": 19, **kw}
        return cls(backbone="resnet", **kw)

    @classmethod
    def xception65(cls, **kw: Any) -> DeepLabConfig:
        """DeepLabV3+ on Xception-65, UniMatch's COCO model (use ``num_classes=81``)."""
        return cls(backbone="xception", **kw)

    @classmethod
    def tiny_resnet(cls, **kw: Any) -> DeepLabConfig:
        """A ResNet DeepLabV3+ with the real graph and few channels, for quick tests."""
        kw = {"resnet_blocks": (1, 2, 2, 1), "resnet_width": 4, "aspp_channels": 8, "low_level_channels": 6,
              "decoder_channels": 8, "num_classes": 5, **kw}
        return cls(backbone="resnet", **kw)

    @classmethod
    def tiny_xception(cls, **kw: Any) -> DeepLabConfig:
        """An Xception DeepLabV3+ with the real graph (2 middle blocks) and few channels, for quick tests."""
        kw = {"xception_widths": (4, 8, 8, 12, 16, 24, 24, 32), "xception_middle": 2, "aspp_channels": 8,
              "low_level_channels": 6, "decoder_channels": 8, "num_classes": 5, **kw}
        return cls(backbone="xception", **kw)

    # ------------------------------------------------------------------ derived values

    @property
    def backbone_momentum(self) -> float:
        if self.backbone_bn_momentum is not None:
            return self.backbone_bn_momentum
        return XCEPTION_BN_MOMENTUM if self.backbone == "xception" else TORCH_BN_MOMENTUM

    @property
    def low_level_in(self) -> int:
        """Channels of the low-level (stride 4) features c1."""
        return 4 * self.resnet_width if self.backbone == "resnet" else self.xception_widths[3]

    @property
    def high_level_in(self) -> int:
        """Channels of the high-level (stride ``output_stride``) features c4."""
        return 32 * self.resnet_width if self.backbone == "resnet" else self.xception_widths[7]

    @property
    def variant(self) -> str:
        """A short name: ``resnet101_deep``, ``resnet50_plain``, ``xception65``, or ``custom_*``."""
        if self.backbone == "xception":
            real = self.xception_widths == XCEPTION65_WIDTHS and self.xception_middle == XCEPTION65_MIDDLE
            return "xception65" if real else "custom_xception"
        depth = {v: k for k, v in RESNET_BLOCKS.items()}.get(self.resnet_blocks)
        if depth is None or self.resnet_width != 64:
            return f"custom_resnet_{self.resnet_stem}"
        return f"resnet{depth}_{self.resnet_stem}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeepLabConfig:
        return cls(**json.loads(text))

    def replace(self, **kw: Any) -> DeepLabConfig:
        return dataclasses.replace(self, **kw)

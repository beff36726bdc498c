"""PyTorch reference of UniMatch V2's DPT segmentation model, for parity tests and the converter tests.

UniMatch V2 (github LiheYoung/UniMatch-V2) has **no installable package**, so this file is a
literal re-statement of its model code at commit ``f6afb4df``:

* ``model/util/blocks.py``: ``_make_scratch``, ``ResidualConvUnit``, ``FeatureFusionBlock``;
* ``model/semseg/dpt.py``: ``_make_fusion_block``, ``DPTHead``, ``DPT``;
* ``unimatch_v2.py``: the per-encoder ``model_configs`` table (``MODEL_CONFIGS`` here).

Module structure and parameter names are V2's, so ``DPT(...).state_dict()`` has the keys of a V2
checkpoint (``backbone.*``, ``head.projects.0.weight``, ``head.resize_layers.0.weight``,
``head.scratch.layer1_rn.weight``, ``head.scratch.refinenet1.resConfUnit2.conv1.weight``,
``head.scratch.output_conv.2.bias``, ...). Differences, none of which changes what is computed:

* ``DPT`` takes its encoder as an argument (``backbone``: any module with ``embed_dim`` and
  ``get_intermediate_layers(x, indices)`` returning the normalised patch tokens (B, N, C) of the
  given blocks, as V2's DINOv2 does) instead of building ``DINOv2(model_name=encoder_size)``;
  the DINOv2 reference or a test stand-in can be plugged in. ``layer_indices`` may override V2's
  per-size block indices (for shallow test encoders).
* Complementary dropout: ``forward(x, comp_drop=True, comp_drop_mask=...)`` accepts the (B, C)
  mask so that a parity test can give both implementations the same one; without it the mask is
  drawn exactly as V2 draws it (``draw_complementary_mask``), on the features' device rather
  than with ``.cuda()``.
* ``nn.quantized.FloatFunctional().add`` (a plain tensor addition outside quantisation, holding
  no weights) is written as ``+``; the ``groups > 1`` branch of ``ResidualConvUnit`` (never taken:
  ``groups`` is fixed to 1) is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# unimatch_v2.py's model_configs: head width ("features") and per-level projection widths per encoder
MODEL_CONFIGS = {
    "small": {"encoder_size": "small", "features": 64, "out_channels": [48, 96, 192, 384]},
    "base": {"encoder_size": "base", "features": 128, "out_channels": [96, 192, 384, 768]},
    "large": {"encoder_size": "large", "features": 256, "out_channels": [256, 512, 1024, 1024]},
    "giant": {"encoder_size": "giant", "features": 384, "out_channels": [1536, 1536, 1536, 1536]},
}
# dpt.py's DPT.intermediate_layer_idx
INTERMEDIATE_LAYER_IDX = {
    "small": [2, 5, 8, 11],
    "base": [2, 5, 8, 11],
    "large": [4, 11, 17, 23],
    "giant": [9, 19, 29, 39],
}
PATCH_SIZE = 14


# ----------------------------------------------------------------------------- model/util/blocks.py


def _make_scratch(in_shape, out_shape, groups=1, expand=False):
    scratch = nn.Module()

    out_shape1 = out_shape
    out_shape2 = out_shape
    out_shape3 = out_shape
    if len(in_shape) >= 4:
        out_shape4 = out_shape

    if expand:
        out_shape1 = out_shape
        out_shape2 = out_shape * 2
        out_shape3 = out_shape * 4
        if len(in_shape) >= 4:
            out_shape4 = out_shape * 8

    scratch.layer1_rn = nn.Conv2d(in_shape[0], out_shape1, kernel_size=3, stride=1, padding=1, bias=False,
                                  groups=groups)
    scratch.layer2_rn = nn.Conv2d(in_shape[1], out_shape2, kernel_size=3, stride=1, padding=1, bias=False,
                                  groups=groups)
    scratch.layer3_rn = nn.Conv2d(in_shape[2], out_shape3, kernel_size=3, stride=1, padding=1, bias=False,
                                  groups=groups)
    if len(in_shape) >= 4:
        scratch.layer4_rn = nn.Conv2d(in_shape[3], out_shape4, kernel_size=3, stride=1, padding=1, bias=False,
                                      groups=groups)
    return scratch


class ResidualConvUnit(nn.Module):
    """activation -> conv1 (-> bn1) -> activation -> conv2 (-> bn2), plus the input."""

    def __init__(self, features, activation, bn):
        super().__init__()
        self.bn = bn
        self.groups = 1
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True, groups=self.groups)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True, groups=self.groups)
        if self.bn is True:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.activation = activation

    def forward(self, x):
        out = self.activation(x)
        out = self.conv1(out)
        if self.bn is True:
            out = self.bn1(out)
        out = self.activation(out)
        out = self.conv2(out)
        if self.bn is True:
            out = self.bn2(out)
        return out + x


class FeatureFusionBlock(nn.Module):
    """(coarser path [, same-level skip]) -> fused, resized (align_corners bilinear), 1x1 out_conv."""

    def __init__(self, features, activation, deconv=False, bn=False, expand=False, align_corners=True, size=None):
        super().__init__()
        self.deconv = deconv
        self.align_corners = align_corners
        self.groups = 1
        self.expand = expand
        out_features = features
        if self.expand is True:
            out_features = features // 2
        self.out_conv = nn.Conv2d(features, out_features, kernel_size=1, stride=1, padding=0, bias=True, groups=1)
        # Built for every block; refinenet4 (called with one input) never uses resConfUnit1,
        # whose weights are nevertheless in every V2 state_dict.
        self.resConfUnit1 = ResidualConvUnit(features, activation, bn)
        self.resConfUnit2 = ResidualConvUnit(features, activation, bn)
        self.size = size

    def forward(self, *xs, size=None):
        output = xs[0]
        if len(xs) == 2:
            res = self.resConfUnit1(xs[1])
            output = output + res
        output = self.resConfUnit2(output)
        if (size is None) and (self.size is None):
            modifier = {"scale_factor": 2}
        elif size is None:
            modifier = {"size": self.size}
        else:
            modifier = {"size": size}
        output = nn.functional.interpolate(output, **modifier, mode="bilinear", align_corners=self.align_corners)
        output = self.out_conv(output)
        return output


# ----------------------------------------------------------------------------- model/semseg/dpt.py


def _make_fusion_block(features, use_bn, size=None):
    return FeatureFusionBlock(features, nn.ReLU(False), deconv=False, bn=use_bn, expand=False, align_corners=True,
                              size=size)


class DPTHead(nn.Module):
    def __init__(self, nclass, in_channels, features=256, use_bn=False, out_channels=(256, 512, 1024, 1024)):
        super().__init__()
        out_channels = list(out_channels)
        self.projects = nn.ModuleList([
            nn.Conv2d(in_channels=in_channels, out_channels=out_channel, kernel_size=1, stride=1, padding=0)
            for out_channel in out_channels
        ])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(in_channels=out_channels[0], out_channels=out_channels[0], kernel_size=4, stride=4,
                               padding=0),
            nn.ConvTranspose2d(in_channels=out_channels[1], out_channels=out_channels[1], kernel_size=2, stride=2,
                               padding=0),
            nn.Identity(),
            nn.Conv2d(in_channels=out_channels[3], out_channels=out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = _make_scratch(out_channels, features, groups=1, expand=False)
        self.scratch.stem_transpose = None
        self.scratch.refinenet1 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet2 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet3 = _make_fusion_block(features, use_bn)
        self.scratch.refinenet4 = _make_fusion_block(features, use_bn)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1),
            nn.ReLU(True),
            nn.Conv2d(features, nclass, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, out_features, patch_h, patch_w):
        out = []
        for i, x in enumerate(out_features):
            x = x.permute(0, 2, 1).reshape((x.shape[0], x.shape[-1], patch_h, patch_w))
            x = self.projects[i](x)
            x = self.resize_layers[i](x)
            out.append(x)

        layer_1, layer_2, layer_3, layer_4 = out

        layer_1_rn = self.scratch.layer1_rn(layer_1)
        layer_2_rn = self.scratch.layer2_rn(layer_2)
        layer_3_rn = self.scratch.layer3_rn(layer_3)
        layer_4_rn = self.scratch.layer4_rn(layer_4)

        path_4 = self.scratch.refinenet4(layer_4_rn, size=layer_3_rn.shape[2:])
        path_3 = self.scratch.refinenet3(path_4, layer_3_rn, size=layer_2_rn.shape[2:])
        path_2 = self.scratch.refinenet2(path_3, layer_2_rn, size=layer_1_rn.shape[2:])
        path_1 = self.scratch.refinenet1(path_2, layer_1_rn)

        out = self.scratch.output_conv(path_1)
        return out


def draw_complementary_mask(bs: int, dim: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """V2's complementary-dropout mask (B, C), drawn as ``DPT.forward(comp_drop=True)`` draws it.

    ``m1 = Binomial(0.5) * 2`` for the first B/2 samples, ``m2 = 2 - m1`` for the second half,
    and ``int(B/2 * 0.5)`` rows chosen by ``randperm(B/2)`` set to 1 in both halves.
    (V2 samples ``torch.distributions.Binomial``; ``torch.bernoulli`` has the same distribution
    and takes a generator.)
    """
    probs = torch.full((bs // 2, dim), 0.5)
    dropout_mask1 = torch.bernoulli(probs, generator=generator) * 2.0
    dropout_mask2 = 2.0 - dropout_mask1
    dropout_prob = 0.5
    num_kept = int(bs // 2 * (1 - dropout_prob))
    kept_indexes = torch.randperm(bs // 2, generator=generator)[:num_kept]
    dropout_mask1[kept_indexes, :] = 1.0
    dropout_mask2[kept_indexes, :] = 1.0
    return torch.cat((dropout_mask1, dropout_mask2)).to(device)


class DPT(nn.Module):
    """V2's ``DPT`` with an injected encoder (see the module docstring)."""

    def __init__(self, backbone: nn.Module, encoder_size="base", nclass=21, features=128,
                 out_channels=(96, 192, 384, 768), use_bn=False, layer_indices: Sequence[int] | None = None):
        super().__init__()
        self.intermediate_layer_idx = dict(INTERMEDIATE_LAYER_IDX)
        if layer_indices is not None:
            self.intermediate_layer_idx[encoder_size] = list(layer_indices)
        self.encoder_size = encoder_size
        self.backbone = backbone
        self.head = DPTHead(nclass, self.backbone.embed_dim, features, use_bn, out_channels=out_channels)

    def lock_backbone(self):
        for p in self.backbone.parameters():
            p.requires_grad = False

    def forward(self, x, comp_drop=False, comp_drop_mask: torch.Tensor | None = None):
        patch_h, patch_w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE

        features = self.backbone.get_intermediate_layers(x, self.intermediate_layer_idx[self.encoder_size])

        if comp_drop:
            bs, dim = features[0].shape[0], features[0].shape[-1]
            dropout_mask = comp_drop_mask if comp_drop_mask is not None else draw_complementary_mask(
                bs, dim, device=features[0].device)
            features = (feature * dropout_mask.unsqueeze(1) for feature in features)
            out = self.head(features, patch_h, patch_w)
            out = F.interpolate(out, (patch_h * PATCH_SIZE, patch_w * PATCH_SIZE), mode="bilinear",
                                align_corners=True)
            return out

        out = self.head(features, patch_h, patch_w)
        out = F.interpolate(out, (patch_h * PATCH_SIZE, patch_w * PATCH_SIZE), mode="bilinear", align_corners=True)
        return out


def build(backbone: nn.Module, encoder_size: str, nclass: int, *, features: int | None = None,
          out_channels: Sequence[int] | None = None, layer_indices: Sequence[int] | None = None) -> DPT:
    """``DPT`` as ``unimatch_v2.py`` builds it for ``encoder_size`` (widths from ``MODEL_CONFIGS``),
    or with explicit (e.g. tiny) ``features`` / ``out_channels`` / ``layer_indices``."""
    widths = MODEL_CONFIGS.get(encoder_size, {})
    return DPT(backbone, encoder_size=encoder_size, nclass=nclass,
               features=features if features is not None else widths["features"],
               out_channels=list(out_channels) if out_channels is not None else widths["out_channels"],
               layer_indices=layer_indices)

"""PyTorch reference of UniMatch's DeepLabV3+ for parity tests and benchmarks (no torchvision).

Written for this project from the published architecture (DeepLabV3+, ResNet v1.5 / v1c,
aligned Xception) with the module structure and parameter names of UniMatch's
``model/semseg/deeplabv3plus.py``, ``model/backbone/resnet.py`` and
``model/backbone/xception.py``, so that ``state_dict()`` has UniMatch's keys
(``backbone.conv1.0.weight``, ``head.b4.gap.1.weight``, ``fuse.3.weight``, ...). With
``stem="plain"`` the ResNet has torchvision's keys (``conv1.weight``, ``bn1.*``, and ``fc.*``
with ``with_fc=True``). Widths are parameters so that tiny models exist on both sides.

UniMatch's in-place ReLUs are written out explicitly here (see ``_XBlock.forward``) rather
than relied upon, so the reference says what it computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

XCEPTION_BN_MOMENTUM = 0.0003


# ----------------------------------------------------------------------------- ResNet


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = 4 * planes
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Bottleneck ResNet; ``base_forward`` returns (c1, c2, c3, c4) like UniMatch's."""

    def __init__(self, blocks: Sequence[int] = (3, 4, 23, 3), *, stem: str = "deep", width: int = 64,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, True), multi_grid: bool = False,
                 with_fc: bool = False):
        super().__init__()
        w = width
        if stem == "deep":
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False))
            self.bn1 = nn.BatchNorm2d(2 * w)
            cin = 2 * w
        else:
            self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            cin = w
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilation = 1
        for i, n in enumerate(blocks):
            planes, stride = w * 2**i, (1 if i == 0 else 2)
            first_dilation = dilation
            if i > 0 and replace_stride_with_dilation[i - 1]:
                dilation, stride = dilation * stride, 1
            # multi-grid (UniMatch's Cityscapes setting) scales the last stage's dilations by 2, 2, 4
            grids = (2, 2, 4) if multi_grid and i == 3 else (1,) * n
            layer = []
            for j in range(n):
                d = (first_dilation if j == 0 else dilation) * grids[j]
                layer.append(Bottleneck(cin, planes, stride if j == 0 else 1, d))
                cin = 4 * planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        if with_fc:  # torchvision's classifier, present in its state_dicts, unused here
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, 1000)

    def base_forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


# ----------------------------------------------------------------------------- Xception


class SeparableConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, activate_first: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, momentum=XCEPTION_BN_MOMENTUM)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=XCEPTION_BN_MOMENTUM)
        self.activate_first = activate_first

    def forward(self, x):
        if self.activate_first:
            x = F.relu(x)
        x = self.bn1(self.depthwise(x))
        if not self.activate_first:
            x = F.relu(x)
        x = self.bn2(self.pointwise(x))
        if not self.activate_first:
            x = F.relu(x)
        return x


class _XBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, grow_first: bool = True):
        super().__init__()
        self.skip = None
        if cin != cout or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout, momentum=XCEPTION_BN_MOMENTUM)
        mid = cout if grow_first else cin
        self.sepconv1 = SeparableConv2d(cin, mid, 1, dilation)
        self.sepconv2 = SeparableConv2d(mid, cout, 1, dilation)
        self.sepconv3 = SeparableConv2d(cout, cout, stride, dilation)
        self.hook_layer = None

    def forward(self, x):
        if self.skip is not None:
            skip = self.skipbn(self.skip(x))
        else:
            # UniMatch's first separable conv applies its ReLU in place, which also changes the
            # tensor the identity shortcut refers to.
            x = F.relu(x)
            skip = x
        y = self.sepconv2(self.sepconv1(x))
        self.hook_layer = y  # the pre-ReLU output UniMatch uses as low-level features (block 2)
        return self.sepconv3(y) + skip


class Xception(nn.Module):
    def __init__(self, os: int = 16, widths: Sequence[int] = (32, 64, 128, 256, 728, 1024, 1536, 2048),
                 middle: int = 16):
        super().__init__()
        c1, c2, b1, b2, mid, b20, ex, out = widths
        rate = 16 // os
        self.conv1 = nn.Conv2d(3, c1, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1, momentum=XCEPTION_BN_MOMENTUM)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2, momentum=XCEPTION_BN_MOMENTUM)
        self.block1 = _XBlock(c2, b1, 2)
        self.block2 = _XBlock(b1, b2, 2)
        self.block3 = _XBlock(b2, mid, 2 if os == 16 else 1)
        self.n_blocks = 3 + middle + 1
        for i in range(4, 4 + middle):
            setattr(self, f"block{i}", _XBlock(mid, mid, 1, rate))
        setattr(self, f"block{self.n_blocks}", _XBlock(mid, b20, 1, rate, grow_first=False))
        self.conv3 = SeparableConv2d(b20, ex, 1, rate, activate_first=False)
        self.conv4 = SeparableConv2d(ex, ex, 1, rate, activate_first=False)
        self.conv5 = SeparableConv2d(ex, out, 1, rate, activate_first=False)

    def base_forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        c1 = None
        for i in range(1, self.n_blocks + 1):
            block = getattr(self, f"block{i}")
            x = block(x)
            if i == 2:
                c1 = block.hook_layer
        return c1, self.conv5(self.conv4(self.conv3(x)))


# ----------------------------------------------------------------------------- DeepLabV3+


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class ASPPModule(nn.Module):
    def __init__(self, cin: int, rates: Sequence[int], cout: int | None = None):
        super().__init__()
        cout = cout or cin // 8
        self.b0 = _conv_bn_relu(cin, cout, 1)
        self.b1 = _conv_bn_relu(cin, cout, 3, rates[0])
        self.b2 = _conv_bn_relu(cin, cout, 3, rates[1])
        self.b3 = _conv_bn_relu(cin, cout, 3, rates[2])
        self.b4 = ASPPPooling(cin, cout)
        self.project = _conv_bn_relu(5 * cout, cout, 1)

    def forward(self, x):
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class DeepLabV3Plus(nn.Module):
    """UniMatch's DeepLabV3+; ``forward(x, need_fp, fp_masks)`` with optional explicit
    channel keep-masks ``(mask_c1 (B, C_low), mask_c4 (B, C_high))`` in place of Dropout2d(0.5)."""

    def __init__(self, backbone: nn.Module, nclass: int, dilations: Sequence[int] = (6, 12, 18), *,
                 low_channels: int = 256, high_channels: int = 2048, aspp_channels: int | None = None,
                 reduce_channels: int = 48, fuse_channels: int = 256):
        super().__init__()
        self.backbone = backbone
        aspp = aspp_channels or high_channels // 8
        self.head = ASPPModule(high_channels, dilations, aspp)
        self.reduce = _conv_bn_relu(low_channels, reduce_channels, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(aspp + reduce_channels, fuse_channels, 3, padding=1, bias=False), nn.BatchNorm2d(fuse_channels),
            nn.ReLU(),
            nn.Conv2d(fuse_channels, fuse_channels, 3, padding=1, bias=False), nn.BatchNorm2d(fuse_channels),
            nn.ReLU())
        self.classifier = nn.Conv2d(fuse_channels, nclass, 1, bias=True)

    def _decode(self, c1, c4):
        c4 = self.head(c4)
        c4 = F.interpolate(c4, c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], 1)))

    def forward(self, x, need_fp: bool = False, fp_masks=None):
        h, w = x.shape[-2:]
        feats = self.backbone.base_forward(x)
        c1, c4 = feats[0], feats[-1]
        if not need_fp:
            return F.interpolate(self._decode(c1, c4), (h, w), mode="bilinear", align_corners=True)
        if fp_masks is None:
            d1, d4 = F.dropout2d(c1, 0.5, True), F.dropout2d(c4, 0.5, True)
        else:
            m1, m4 = (torch.as_tensor(m).to(c1.dtype) for m in fp_masks)
            d1, d4 = c1 * (m1 * 2.0)[:, :, None, None], c4 * (m4 * 2.0)[:, :, None, None]
        outs = self._decode(torch.cat([c1, d1]), torch.cat([c4, d4]))
        outs = F.interpolate(outs, (h, w), mode="bilinear", align_corners=True)
        return outs.chunk(2)


def build(config) -> DeepLabV3Plus:
    """The reference for a ``zsp_jax.models.deeplab.DeepLabConfig`` (same widths, depth, stem, stride)."""
    if config.backbone == "resnet":
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[config.output_stride]
        backbone = ResNet(config.resnet_blocks, stem=config.resnet_stem, width=config.resnet_width,
                          replace_stride_with_dilation=dilate, multi_grid=config.resnet_multi_grid)
    else:
        backbone = Xception(config.output_stride, config.xception_widths, config.xception_middle)
    return DeepLabV3Plus(backbone, config.num_classes, config.aspp_rates, low_channels=config.low_level_in,
                         high_channels=config.high_level_in, aspp_channels=config.aspp_channels,
                         reduce_channels=config.low_level_channels, fuse_channels=config.decoder_channels)

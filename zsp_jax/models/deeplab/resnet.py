"""ResNet backbones for DeepLabV3+ (bottleneck ResNet-50/101/152), NHWC.

Structure as in UniMatch's ``model/backbone/resnet.py`` and torchvision's ``resnet.py``
(ResNet v1.5: the stride sits on the 3x3 conv of the bottleneck):

* stem ``"deep"`` (UniMatch, a.k.a. ResNet-v1c): 3x3/2 conv 64 + BN + ReLU, 3x3 conv 64 + BN
  + ReLU, 3x3 conv 128 + BN + ReLU; ``"plain"`` (torchvision): 7x7/2 conv 64 + BN + ReLU;
  then a 3x3/2 max-pool.
* four stages of bottlenecks; output stride 16 replaces the stride of stage 4 by dilation 2
  (8: stage 3 dilation 2, stage 4 dilation 4). As in torchvision's
  ``replace_stride_with_dilation``, the first block of a dilated stage keeps the previous
  dilation on its 3x3 conv and the later blocks use the new one.
* ``resnet_multi_grid`` (UniMatch's Cityscapes setting): stage 4's blocks multiply those
  dilations by (2, 2, 4), e.g. 4, 8, 16 at output stride 8 and 2, 4, 8 at output stride 16.

Returns the stage-1 output (stride 4, ``4 * width`` channels) as the low-level features and
the stage-4 output (``32 * width`` channels) as the high-level features.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.deeplab.config import MULTI_GRID, DeepLabConfig
from zsp_jax.models.deeplab.layers import BatchNorm, ConvBN, conv, max_pool_3x3_s2

Array = jax.Array


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), BN after each, identity or projection shortcut."""

    def __init__(self, in_ch: int, planes: int, *, stride: int, dilation: int, momentum: float, epsilon: float,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        out_ch = 4 * planes
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(in_ch, planes, 1, **kw)
        self.bn1 = BatchNorm(planes, **bn)
        self.conv2 = conv(planes, planes, 3, stride=stride, dilation=dilation, **kw)
        self.bn2 = BatchNorm(planes, **bn)
        self.conv3 = conv(planes, out_ch, 1, **kw)
        self.bn3 = BatchNorm(out_ch, **bn)
        self.downsample = (ConvBN(in_ch, out_ch, 1, stride=stride, momentum=momentum, epsilon=epsilon, **kw)
                           if stride != 1 or in_ch != out_ch else None)

    def __call__(self, x: Array, *, train: bool) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        y = jax.nn.relu(self.bn2(self.conv2(y), train=train))
        y = self.bn3(self.conv3(y), train=train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train, relu=False)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet feature extractor: ``(B, H, W, 3) -> (c1 (B, H/4, W/4, 4w), c4 (B, H/os, W/os, 32w))``.

    Spatial sizes follow PyTorch's floor arithmetic: each stride-2 layer maps n to
    ``(n - 1) // 2 + 1``.
    """

    def __init__(self, config: DeepLabConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        m, eps = config.backbone_momentum, config.bn_epsilon
        kw = dict(momentum=m, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        w = config.resnet_width
        if config.resnet_stem == "deep":
            self.stem = nnx.List([ConvBN(3, w, 3, stride=2, **kw), ConvBN(w, w, 3, **kw),
                                  ConvBN(w, 2 * w, 3, **kw)])
            in_ch = 2 * w
        else:
            self.stem = nnx.List([ConvBN(3, w, 7, stride=2, **kw)])
            in_ch = w
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[config.output_stride]
        dilation = 1
        stages = []
        for i, n_blocks in enumerate(config.resnet_blocks):
            planes = w * 2**i
            stride = 1 if i == 0 else 2
            previous = dilation
            if i > 0 and dilate[i - 1]:
                dilation *= stride
                stride = 1
            grid = MULTI_GRID if i == 3 and config.resnet_multi_grid else (1,) * n_blocks
            blocks = []
            for j in range(n_blocks):
                blocks.append(Bottleneck(in_ch, planes, stride=stride if j == 0 else 1,
                                         dilation=(previous if j == 0 else dilation) * grid[j], **kw))
                in_ch = 4 * planes
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        for layer in self.stem:
            x = layer(x, train=train)
        x = max_pool_3x3_s2(x)
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, train=train)
            feats.append(x)
        return feats[0], feats[3]

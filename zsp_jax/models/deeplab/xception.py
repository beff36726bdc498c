"""Xception-65 backbone for DeepLabV3+ (UniMatch's COCO backbone), NHWC.

Structure as in UniMatch's ``model/backbone/xception.py`` (the aligned Xception of
DeepLabV3+): a 3x3/2 conv 32 and a 3x3 conv 64 (BN, ReLU); entry flow blocks 1-3 (128, 256,
728 channels, stride 2 each at output stride 16; block 3 keeps stride 1 at output stride 8);
16 middle-flow blocks of 728; exit block 20 (728 -> 1024); three separable convs 1536, 1536,
2048. Blocks 4-20 and the exit convs are dilated by ``16 // output_stride``.

Each block is three separable convs (depthwise 3x3 + BN, pointwise 1x1 + BN, ReLU *before*
each: "activate first") plus a shortcut that is a 1x1 conv + BN when the shape changes.
The exit convs use ReLU *after* each BN instead. The momentum of every backbone BN is torch
0.0003 (Flax 0.9997).

Two behaviours of UniMatch's code that come from in-place ReLUs, reproduced here:

* in a block with an identity shortcut, the first separable conv's in-place ReLU rewrites the
  block input, so the shortcut adds ``relu(x)``, not ``x``;
* the low-level features c1 are block 2's second separable conv output *before* any ReLU
  (block 2 is built with ``inplace=False`` for exactly that reason), at stride 4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.deeplab.config import DeepLabConfig
from zsp_jax.models.deeplab.layers import BatchNorm, ConvBN, conv

Array = jax.Array


class SeparableConv(nnx.Module):
    """ReLU -> depthwise 3x3 -> BN -> pointwise 1x1 -> BN (activate_first), or
    depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU (not activate_first)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1, activate_first: bool = True,
                 momentum: float, epsilon: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
        self.activate_first = activate_first
        self.depthwise = conv(in_ch, in_ch, 3, stride=stride, dilation=dilation, groups=in_ch, **kw)
        self.depthwise_bn = BatchNorm(in_ch, **bn)
        self.pointwise = conv(in_ch, out_ch, 1, **kw)
        self.pointwise_bn = BatchNorm(out_ch, **bn)

    def __call__(self, x: Array, *, train: bool) -> Array:
        if self.activate_first:
            x = jax.nn.relu(x)
        x = self.depthwise_bn(self.depthwise(x), train=train)
        if not self.activate_first:
            x = jax.nn.relu(x)
        x = self.pointwise_bn(self.pointwise(x), train=train)
        if not self.activate_first:
            x = jax.nn.relu(x)
        return x


class XceptionBlock(nnx.Module):
    """Three separable convs (the last one strided) plus a shortcut; returns (output, hook) where
    hook is the second separable conv's output (before the third conv's ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1, grow_first: bool = True,
                 momentum: float, epsilon: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mid = out_ch if grow_first else in_ch
        self.skip = ConvBN(in_ch, out_ch, 1, stride=stride, **kw) if in_ch != out_ch or stride != 1 else None
        self.sepconv = nnx.List([
            SeparableConv(in_ch, mid, dilation=dilation, **kw),
            SeparableConv(mid, out_ch, dilation=dilation, **kw),
            SeparableConv(out_ch, out_ch, stride=stride, dilation=dilation, **kw),
        ])

    def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        if self.skip is not None:
            shortcut = self.skip(x, train=train, relu=False)
        else:
            x = jax.nn.relu(x)  # UniMatch's in-place ReLU also rewrites the identity shortcut
            shortcut = x
        y = self.sepconv[0](x, train=train)
        hook = self.sepconv[1](y, train=train)
        return self.sepconv[2](hook, train=train) + shortcut, hook


class Xception(nnx.Module):
    """Xception feature extractor: ``(B, H, W, 3) -> (c1 (B, H/4, W/4, widths[3]), c4 (B, H/os, W/os, widths[7]))``."""

    def __init__(self, config: DeepLabConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(momentum=config.backbone_momentum, epsilon=config.bn_epsilon, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        w_conv1, w_conv2, w_b1, w_b2, w_mid, w_b20, w_exit, w_out = config.xception_widths
        os = config.output_stride
        rate = 16 // os
        self.stem = nnx.List([ConvBN(3, w_conv1, 3, stride=2, **kw), ConvBN(w_conv1, w_conv2, 3, **kw)])
        blocks = [
            XceptionBlock(w_conv2, w_b1, stride=2, **kw),
            XceptionBlock(w_b1, w_b2, stride=2, **kw),
            XceptionBlock(w_b2, w_mid, stride=2 if os == 16 else 1, **kw),
        ]
        blocks += [XceptionBlock(w_mid, w_mid, dilation=rate, **kw) for _ in range(config.xception_middle)]
        blocks.append(XceptionBlock(w_mid, w_b20, dilation=rate, grow_first=False, **kw))
        self.blocks = nnx.List(blocks)
        self.exit = nnx.List([
            SeparableConv(w_b20, w_exit, dilation=rate, activate_first=False, **kw),
            SeparableConv(w_exit, w_exit, dilation=rate, activate_first=False, **kw),
            SeparableConv(w_exit, w_out, dilation=rate, activate_first=False, **kw),
        ])

    def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        for layer in self.stem:
            x = layer(x, train=train)
        c1 = None
        for i, block in enumerate(self.blocks):
            x, hook = block(x, train=train)
            if i == 1:
                c1 = hook
        for layer in self.exit:
            x = layer(x, train=train)
        return c1, x

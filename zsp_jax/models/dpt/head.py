"""UniMatch V2's DPT segmentation head (``model/semseg/dpt.py``, ``model/util/blocks.py``), NHWC, Flax NNX.

From four (B, N, C) token maps of the encoder (N = h * w patches, row-major) to logits at 8x the
patch grid:

* reassemble: per level a 1x1 projection (with bias) to ``out_channels[i]``, then a resize to
  four scales: transposed conv 4x4 stride 4 (4h), transposed conv 2x2 stride 2 (2h), identity (h),
  3x3 conv stride 2 padding 1 (ceil(h / 2));
* ``scratch.layerN_rn``: 3x3 convs without bias to ``features``;
* four fusion blocks (``refinenet4`` .. ``refinenet1``), each: [skip through a residual conv unit,
  added], a residual conv unit, bilinear ``align_corners=True`` resize to the next finer level's
  size (x2 for the last), 1x1 ``out_conv``; a residual conv unit is ReLU, 3x3 conv, ReLU, 3x3 conv,
  plus its input (no BatchNorm: V2 builds the head with ``use_bn=False``);
* output: 3x3 conv, ReLU, 1x1 conv to the classes.

Why our own ``TileConvTranspose`` rather than ``nnx.ConvTranspose``: with kernel == stride and no
padding the tiles do not overlap, so the layer is exactly one matmul (B*h*w, C) x (C, s*s*C')
followed by a depth-to-space reshape. XLA lowers ``nnx.ConvTranspose`` to a convolution over the
zero-dilated input, which on the same output does s*s times the multiply-adds, all but one in
s*s of them on inserted zeros. The kernel is stored in ``nnx.ConvTranspose``'s layout
(``transpose_kernel=False``), so the shared ``zsp_jax.utils.weights.conv_transpose2d`` transform
converts torch's weights and an ``nnx.ConvTranspose`` loaded with the same kernel gives the same
result (tests/dpt/head_parity_test.py checks both).

The refinenet that starts the top-down path (``refinenet4``) is called with a single input in
V2, so its first residual unit, although present in V2's state_dict, never runs: this module
does not build it, and the converter drops those tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.deeplab.layers import Conv2d, torch_default_bias_init, torch_default_kernel_init
from zsp_jax.models.dpt.config import DptHeadConfig
from zsp_jax.utils.resize import resize_bilinear_align_corners

Array = jax.Array


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, bias: bool = True, dtype: Any,
          param_dtype: Any, rngs: nnx.Rngs) -> Conv2d:
    """A torch-geometry conv (padding (k - 1) // 2) with PyTorch's default init, as V2's head is initialised."""
    return Conv2d(in_ch, out_ch, kernel, stride=stride, bias=bias, kernel_init=torch_default_kernel_init,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TileConvTranspose(nnx.Module):
    """``nn.ConvTranspose2d(in_ch, out_ch, kernel_size=s, stride=s, padding=0)`` on NHWC maps.

    ``kernel`` (s, s, in_ch, out_ch) is in ``nnx.ConvTranspose``'s layout, i.e. torch's weight
    (in_ch, out_ch, s, s) spatially flipped and transposed (``weights.conv_transpose2d``);
    ``bias`` (out_ch,). Output pixel (s*i + a, s*j + b) = x[i, j] @ torch_weight[:, :, a, b] + bias.
    """

    def __init__(self, in_ch: int, out_ch: int, scale: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.scale = scale
        self.dtype = dtype
        # PyTorch's ConvTranspose2d init: fan_in is computed from weight dim 1 (out_ch) * s * s
        fan_in = out_ch * scale * scale
        bound = 1.0 / np.sqrt(fan_in)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (scale, scale, in_ch, out_ch), param_dtype,
                                                   -bound, bound))
        self.bias = nnx.Param(torch_default_bias_init(fan_in)(rngs.params(), (out_ch,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """x: (B, h, w, in_ch) -> (B, s*h, s*w, out_ch)."""
        dtype = self.dtype or jnp.promote_types(x.dtype, self.kernel.get_value().dtype)
        s = self.scale
        # undo the flip of the stored (nnx.ConvTranspose) layout: tap (a, b) writes output offset (a, b)
        taps = self.kernel.get_value()[::-1, ::-1].astype(dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(dtype), taps)
        b, h, _, w, _, o = y.shape
        return y.reshape(b, h * s, w * s, o) + self.bias.get_value().astype(dtype)


class ResidualConvUnit(nnx.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias, width kept."""

    def __init__(self, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(features, features, 3, **kw)
        self.conv2 = _conv(features, features, 3, **kw)

    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, features) -> same shape."""
        y = self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))
        return y + x.astype(y.dtype)


class FusionBlock(nnx.Module):
    """V2's ``FeatureFusionBlock`` (``deconv=False, bn=False, expand=False, align_corners=True``).

    ``with_skip=False`` builds the block that starts the top-down path (V2's ``refinenet4``),
    which takes no same-level skip and so has no first residual unit.
    """

    def __init__(self, features: int, *, with_skip: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.skip_unit = ResidualConvUnit(features, **kw) if with_skip else nnx.data(None)
        self.unit = ResidualConvUnit(features, **kw)
        self.out_conv = _conv(features, features, 1, **kw)

    def __call__(self, path: Array, skip: Array | None = None, *, size: tuple[int, int] | None = None) -> Array:
        """path: (B, h, w, F); skip: (B, h, w, F) or None -> (B, size or (2h, 2w), F)."""
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("this fusion block was built without a skip input (with_skip=False)")
            path = path + self.skip_unit(skip)
        y = self.unit(path)
        h, w = y.shape[1:3]
        y = resize_bilinear_align_corners(y, size if size is not None else (2 * h, 2 * w))
        return self.out_conv(y)


class DptHead(nnx.Module):
    """The DPT head: four encoder token maps -> (B, 8h, 8w, num_classes) logits (see the module docstring).

    Parameter paths: ``projects.{0..3}``, ``upsample4`` / ``upsample2`` (V2's ``resize_layers.0/1``),
    ``downsample2`` (``resize_layers.3``), ``layer_rn.{0..3}`` (``scratch.layer{1..4}_rn``),
    ``refine.{0..3}`` (``scratch.refinenet{1..4}``; ``refine.3`` has no ``skip_unit``),
    ``output_conv1`` / ``output_conv2`` (``scratch.output_conv.0/2``).
    """

    def __init__(self, config: DptHeadConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        if config.use_bn:
            raise ValueError("use_bn=True is not implemented (UniMatch V2 builds the head with use_bn=False)")
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths, features = config.out_channels, config.features
        self.projects = nnx.List([_conv(config.embed_dim, c, 1, **kw) for c in widths])
        self.upsample4 = TileConvTranspose(widths[0], widths[0], 4, **kw)
        self.upsample2 = TileConvTranspose(widths[1], widths[1], 2, **kw)
        self.downsample2 = _conv(widths[3], widths[3], 3, stride=2, **kw)
        self.layer_rn = nnx.List([_conv(c, features, 3, bias=False, **kw) for c in widths])
        self.refine = nnx.List([FusionBlock(features, with_skip=i < 3, **kw) for i in range(4)])
        self.output_conv1 = _conv(features, features, 3, **kw)
        self.output_conv2 = _conv(features, config.num_classes, 1, **kw)

    def reassemble(self, features: Sequence[Array], grid: tuple[int, int]) -> list[Array]:
        """Token maps -> the four projected and resized NHWC maps (V2's ``layer_1`` .. ``layer_4``).

        Args:
          features: 4 arrays (B, h*w, embed_dim), patch tokens in row-major order.
          grid: (h, w), the patch grid.

        Returns:
          [(B, 4h, 4w, c0), (B, 2h, 2w, c1), (B, h, w, c2), (B, ceil(h/2), ceil(w/2), c3)].
        """
        if len(features) != 4:
            raise ValueError(f"the DPT head takes 4 feature levels, got {len(features)}")
        h, w = grid
        maps = []
        for i, tokens in enumerate(features):
            b, n, c = tokens.shape
            if n != h * w:
                raise ValueError(f"level {i}: {n} tokens do not form a {h}x{w} patch grid")
            maps.append(self.projects[i](tokens.reshape(b, h, w, c)))
        return [self.upsample4(maps[0]), self.upsample2(maps[1]), maps[2], self.downsample2(maps[3])]

    def fuse(self, layers: Sequence[Array]) -> Array:
        """The four reassembled maps -> ``path_1`` (B, 8h, 8w, features): scratch convs and refinenets."""
        rn = [conv(layer) for conv, layer in zip(self.layer_rn, layers)]
        path = self.refine[3](rn[3], size=rn[2].shape[1:3])
        path = self.refine[2](path, rn[2], size=rn[1].shape[1:3])
        path = self.refine[1](path, rn[1], size=rn[0].shape[1:3])
        return self.refine[0](path, rn[0])

    def output(self, path: Array) -> Array:
        """(B, H, W, features) -> (B, H, W, num_classes): 3x3 conv, ReLU, 1x1 conv."""
        return self.output_conv2(jax.nn.relu(self.output_conv1(path)))

    def __call__(self, features: Sequence[Array], grid: tuple[int, int]) -> Array:
        """4 x (B, h*w, embed_dim) token maps on an (h, w) patch grid -> (B, 8h, 8w, num_classes)
        logits in the compute dtype (``dtype``, else the promoted input/parameter dtype)."""
        return self.output(self.fuse(self.reassemble(features, grid)))

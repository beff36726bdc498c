"""Building blocks of DeepLabV3+ with PyTorch's semantics: convolution (``Conv2d``, with exact
fast paths chosen from static shapes), BatchNorm, conv+BN, max-pool, channel dropout (the bilinear
resize with ``align_corners=True`` is ``zsp_jax.utils.resize.resize_bilinear_align_corners``).

Why our own BatchNorm rather than ``nnx.BatchNorm``: PyTorch (and UniMatch's SyncBatchNorm)
update the running variance with the *unbiased* batch variance (``n / (n - 1)``), which
``nnx.BatchNorm`` does not offer, and we want the train/eval switch as a call argument so
that one pure jitted step can run the model in both modes (UniMatch does).

SyncBN: the batch statistics are ``jnp.mean`` over the batch and spatial axes of the *global*
array. Under ``jax.jit`` with the batch sharded over a mesh, XLA computes them with an
all-reduce, so every device normalises with the statistics of the whole batch, which is what
``torch.nn.SyncBatchNorm`` does across GPUs. No ``axis_name`` or ``shard_map`` is involved
(tests/deeplab/syncbn_test.py compares 8 devices with 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


Array = jax.Array

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# UniMatch's ResNet / Xception init: kaiming_normal(mode="fan_out", nonlinearity="relu").
kaiming_fan_out_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Any:
    """PyTorch's default conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: Any, dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis of NHWC activations, with PyTorch's semantics.

    Train mode normalises with the batch mean and biased variance over (N, H, W), computed in
    fp32 with two passes, and updates ``mean``/``var`` with momentum (Flax convention:
    ``r <- m r + (1 - m) stat``; torch momentum 0.1 is m = 0.9), the variance term being the
    unbiased batch variance as in PyTorch. Eval mode uses the running statistics.
    Parameter names ``scale``, ``bias``, ``mean``, ``var`` are those of ``nnx.BatchNorm``.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stat_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stat_dtype))

    def __call__(self, x: Array, *, train: bool) -> Array:
        """x: (..., C) any float dtype -> same shape, in ``dtype`` (default: x's dtype)."""
        dtype = self.dtype or x.dtype
        acc = jnp.promote_types(x.dtype, jnp.float32)  # statistics in fp32 (fp64 for fp64 inputs)
        axes = tuple(range(x.ndim - 1))
        if train:
            xf = x.astype(acc)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            n = x.size // x.shape[-1]
            # torch raises for n == 1; we keep the running variance finite instead.
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            stat = self.mean.get_value().dtype
            self.mean.set_value((m * self.mean.get_value() + (1.0 - m) * jax.lax.stop_gradient(mean)).astype(stat))
            self.var.set_value((m * self.var.get_value() + (1.0 - m) * jax.lax.stop_gradient(unbiased)).astype(stat))
        else:
            mean, var = self.mean.get_value().astype(acc), self.var.get_value().astype(acc)
        mul = self.scale.get_value().astype(acc) * jax.lax.rsqrt(var + self.epsilon)
        add = self.bias.get_value().astype(acc) - mean * mul
        return (x.astype(acc) * mul + add).astype(dtype)


# A dilated 3x3 conv whose in-range taps make up less than this fraction of the dense work is
# computed tap by tap (see ``Conv2d``).
TAP_DECOMPOSITION_MAX_FRACTION = 0.75


def _valid_tap_fraction(size: int, dilation: int) -> float:
    """Fraction of a 3-tap dilated 1-D conv's (output, tap) pairs that read inside the input."""
    return (size + 2 * max(size - dilation, 0)) / (3 * size)


class Conv2d(nnx.Module):
    """A 2-D convolution with PyTorch's geometry (symmetric padding ``dilation * (k - 1) // 2``),
    NHWC activations, an HWIO ``kernel`` and an optional ``bias`` (the names of ``nnx.Conv``).

    Why not ``nnx.Conv`` directly: the layer picks, from static shapes, the cheapest exact way
    to compute the same result, which matters most on CPU (measured on 2 cores, batch 4):

    * 1x1 convs are a matmul (``einsum``), 1.3-2.5x faster than XLA:CPU's conv;
    * depthwise 3x3 convs (Xception) are a sum of nine shifted, scaled copies in one fusion,
      10-20x faster than XLA:CPU's grouped conv, forward and backward;
    * a dilated 3x3 conv whose off-centre taps mostly read padding (ASPP rates 6/12/18 on a
      21x21 map) is a sum of per-tap matmuls over the in-range region only, which skips the
      zero work (1.7x at rate 6, 13x at rate 18; PyTorch's oneDNN skips it too);
    * everything else is ``lax.conv_general_dilated``.

    The choice is made on every backend, but measured on CPU only (no accelerator so far); on
    GPU/TPU the dense convolutions may win, which ``tools/bench_deeplab.py`` will show.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dilation: int = 1, groups: int = 1,
                 bias: bool = False, kernel_init: Any = kaiming_fan_out_init, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch} -> {out_ch} not divisible by groups {groups}")
        self.kernel_size, self.stride, self.dilation, self.groups = kernel, stride, dilation, groups
        self.in_ch, self.out_ch = in_ch, out_ch
        self.padding = dilation * (kernel - 1) // 2
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel, kernel, in_ch // groups, out_ch), param_dtype))
        fan_in = in_ch // groups * kernel * kernel
        self.bias = nnx.Param(torch_default_bias_init(fan_in)(rngs.params(), (out_ch,), param_dtype)) if bias \
            else nnx.data(None)

    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, in_ch) -> (B, H', W', out_ch) with PyTorch's output size."""
        dtype = self.dtype or jnp.promote_types(x.dtype, self.kernel.get_value().dtype)
        x = x.astype(dtype)
        w = self.kernel.get_value().astype(dtype)
        k, s, d, p = self.kernel_size, self.stride, self.dilation, self.padding
        h, wd = x.shape[1:3]
        if k == 1 and self.groups == 1:
            y = jnp.einsum("bhwc,cd->bhwd", x[:, ::s, ::s] if s > 1 else x, w[0, 0])
        elif k == 3 and self.groups == self.in_ch == self.out_ch:
            y = _depthwise3x3(x, w, s, d)
        elif (k == 3 and s == 1 and self.groups == 1 and d > 1
              and _valid_tap_fraction(h, d) * _valid_tap_fraction(wd, d) < TAP_DECOMPOSITION_MAX_FRACTION):
            y = _dilated3x3_by_taps(x, w, d)
        else:
            y = jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), rhs_dilation=(d, d),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(dtype)
        return y


def _depthwise3x3(x: Array, w: Array, stride: int, dilation: int) -> Array:
    """Depthwise 3x3 conv, padding = dilation: x (B, H, W, C), w (3, 3, 1, C)."""
    b, h, wd, c = x.shape
    d, s = dilation, stride
    xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    ho, wo = (h - 1) // s + 1, (wd - 1) // s + 1
    out = None
    for ky in range(3):
        for kx in range(3):
            end = (b, ky * d + (ho - 1) * s + 1, kx * d + (wo - 1) * s + 1, c)
            tap = jax.lax.slice(xp, (0, ky * d, kx * d, 0), end, (1, s, s, 1)) * w[ky, kx, 0]
            out = tap if out is None else out + tap
    return out


def _dilated3x3_by_taps(x: Array, w: Array, dilation: int) -> Array:
    """Stride-1 dilated 3x3 conv (padding = dilation) as one matmul per tap over the output
    region where that tap reads inside the input; taps that only read padding are skipped."""
    b, h, wd, _ = x.shape
    out = None
    for ky in range(3):
        for kx in range(3):
            dy, dx = (ky - 1) * dilation, (kx - 1) * dilation
            i0, i1 = max(0, -dy), min(h, h - dy)
            j0, j1 = max(0, -dx), min(wd, wd - dx)
            if i0 >= i1 or j0 >= j1:
                continue
            y = jnp.einsum("bhwc,cd->bhwd", x[:, i0 + dy:i1 + dy, j0 + dx:j1 + dx], w[ky, kx])
            if (i0, i1, j0, j1) != (0, h, 0, wd):
                y = jnp.pad(y, ((0, 0), (i0, h - i1), (j0, wd - j1), (0, 0)))
            out = y if out is None else out + y
    return out


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dilation: int = 1, groups: int = 1,
         bias: bool = False, kernel_init: Any = kaiming_fan_out_init, dtype: Any = None,
         param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> Conv2d:
    """``Conv2d`` (kept as a function for the call sites)."""
    return Conv2d(in_ch, out_ch, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias,
                  kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dilation: int = 1,
                 momentum: float = 0.9, epsilon: float = 1e-5, kernel_init: Any = kaiming_fan_out_init,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, kernel, stride=stride, dilation=dilation, kernel_init=kernel_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_ch, momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array, *, train: bool, relu: bool = True) -> Array:
        y = self.bn(self.conv(x), train=train)
        return jax.nn.relu(y) if relu else y


def max_pool_3x3_s2(x: Array) -> Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` on NHWC (padding never wins: it is -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ChannelDropout(nnx.Module):
    """``nn.Dropout2d(rate)`` for NHWC: one keep/drop draw per (sample, channel), kept channels
    scaled by ``1 / (1 - rate)``. Always active, as UniMatch's perturbation is (it builds a
    fresh, training-mode ``nn.Dropout2d`` in every forward).
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None):
        self.rate = rate
        self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

    def sample_mask(self, batch: int, channels: int, *, rngs: nnx.Rngs | Array | None = None) -> Array:
        """A (batch, channels) bool keep-mask (True = keep)."""
        if isinstance(rngs, nnx.Rngs):
            key = rngs["dropout"]()
        elif rngs is not None:
            key = rngs
        elif self.rngs is not None:
            key = self.rngs()
        else:
            raise ValueError("feature perturbation needs randomness: build the model with rngs=nnx.Rngs(..., "
                             "dropout=...) or pass rngs= or explicit fp_masks=")
        return jax.random.bernoulli(key, 1.0 - self.rate, (batch, channels))

    def __call__(self, x: Array, keep: Array) -> Array:
        """x: (B, H, W, C); keep: (B, C) bool or 0/1 -> x with dropped channels zeroed, kept scaled."""
        scale = (keep.astype(x.dtype) * (1.0 / (1.0 - self.rate))).astype(x.dtype)
        return x * scale[:, None, None, :]

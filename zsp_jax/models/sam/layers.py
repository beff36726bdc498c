"""Small building blocks shared by SAM's encoder, prompt encoder and decoder (NHWC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


class KeyStream:
    """Stands in for ``nnx.Rngs`` while SAM's layers are built: ``params()`` folds a Python counter into one key.

    Why: every draw from an ``nnx.Rngs`` updates its ``RngCount`` variable, and under
    ``nnx.eval_shape`` (how converted weights are loaded without running initialisers) flax
    0.12 formats a tracer-provenance message on each update (~7 ms). SAM has about a
    thousand parameters, so building vit_h took 10 s; with this stream it takes about 1 s.
    The caller's ``Rngs`` is advanced once.
    """

    def __init__(self, rngs: Any):
        self._key = rngs.params()
        self._count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU: the exact (erf) form, not JAX's default tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis with torch's two-pass variance.

    On NHWC tensors this is also SAM's ``LayerNorm2d`` (which normalises over channels of
    NCHW). Statistics are computed in float32 even for bf16 activations.
    """
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)


def linear(din: int, dout: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class MLPBlock(nnx.Module):
    """lin2(act(lin1(x))): the ViT MLP (GELU) and the two-way transformer MLP (ReLU)."""

    def __init__(self, dim: int, hidden: int, act: Callable[[jax.Array], jax.Array], *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        self.lin1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lin2 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nnx.Module):
    """``num_layers`` Linear layers with ReLU between them (the decoder's hypernetworks and IoU head)."""

    def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        dims = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nnx.List([linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


def stride2_transpose_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """torch ``ConvTranspose2d(kernel_size=2, stride=2)`` on NHWC: every input pixel paints a 2x2 block.

    Args:
      x: (..., H, W, Cin).
      kernel: (2, 2, Cin, Cout): ``kernel[a, b]`` maps an input pixel to output pixel (2i+a, 2j+b)
        (torch's weight (Cin, Cout, 2, 2) transposed, not flipped).
      bias: (Cout,) or None.

    Returns:
      (..., 2H, 2W, Cout). An einsum plus a reshape: no overlap, so no scatter-add is needed.
    """
    *lead, h, w, _ = x.shape
    y = jnp.einsum("...hwc,abco->...hawbo", x, kernel.astype(x.dtype))
    y = y.reshape(*lead, 2 * h, 2 * w, kernel.shape[-1])
    return y if bias is None else y + bias.astype(y.dtype)

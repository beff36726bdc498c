"""Per-channel functions of uint8 images as 256-entry lookup tables, exact on every backend.

XLA's float32 division is not correctly rounded on CPU (measured: a quarter of
``(x - mean) / std`` values differ from numpy's by one ulp), so a normaliser run on the device
would not reproduce the host's (and the PyTorch references') inputs bit for bit. A uint8
channel has only 256 values: evaluating the host's own numpy formula on them once and looking
the results up on the device gives exactly the host's numbers, at the cost of a gather.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def uint8_table(fn: Callable[[np.ndarray], np.ndarray], channels: int = 3) -> np.ndarray:
    """(256, channels) float32: ``fn`` applied to every uint8 value of every channel.

    ``fn`` takes and returns (N, channels) arrays (the host's per-pixel formula, e.g.
    ``lambda x: (x.astype(np.float32) - mean) / std``); it must act on each pixel independently.
    """
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], channels, axis=1)
    out = np.asarray(fn(values), np.float32)
    if out.shape != (256, channels):
        raise ValueError(f"table function returned shape {out.shape}, expected (256, {channels})")
    return out


def apply_uint8_table(images: jax.Array, table: np.ndarray | jax.Array) -> jax.Array:
    """(..., C) uint8 -> (..., C) float32 ``table[value, channel]`` (jittable)."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    table = jnp.asarray(table, jnp.float32)
    c = images.shape[-1]
    flat = images.astype(jnp.int32) * c + jnp.arange(c, dtype=jnp.int32)
    return jnp.take(table.reshape(-1), flat, mode="clip")

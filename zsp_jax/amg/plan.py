"""The static plan of one compiled mask-generation program: options, bucket, per-layer shapes.

Everything here is a hashable Python value, known before tracing: the plan is a static argument
of ``jax.jit``, and one program is compiled per plan (``zsp_jax.amg.programs``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zsp_jax.amg.geometry import Bucket, crops_per_layer
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.upsample import Resize2d, band_for_long_side


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static shapes of one crop layer."""

    n_crops: int
    n_points: int  # points of the layer grid (before padding)
    batch: int  # points decoded per step: min(points_per_batch, n_points)
    n_padded: int  # n_points padded to a multiple of batch
    stats: Resize2d  # the crop canvas of the layer's statistics (every pixel, or every fast_stride-th)
    stats_chunk: int  # candidates per statistics step (a divisor of 3 * batch)

    @property
    def n_candidates(self) -> int:
        """Candidate masks of one crop: 3 per (padded) point."""
        return 3 * self.n_padded


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about a call: options, model input size, bucket, per-layer shapes.

    Attributes:
      options: the generator's options.
      image_size: S, the encoder's input side.
      bucket: the size class of the images.
      layers: one ``LayerPlan`` per crop layer.
      final: the image canvas of the output masks.
      mask_chunk: kept masks upsampled to full resolution at once (bounds the (chunk, Hb, Wb)
        float32 temporary of the last step).
    """

    options: AmgOptions
    image_size: int
    bucket: Bucket
    layers: tuple[LayerPlan, ...]
    final: Resize2d
    mask_chunk: int = 16

    @classmethod
    def create(cls, options: AmgOptions, image_size: int, bucket: Bucket, *, block: int = 64,
               mask_chunk: int = 16, stats_chunk: int = 48) -> "Plan":
        """The plan of ``options`` for images of ``bucket``.

        Args:
          block: output pixels per block of the banded upsampling (``zsp_jax.amg.upsample``).
          mask_chunk: see the attribute.
          stats_chunk: candidates whose full-resolution logits are evaluated at once for the
            stability scores (rounded down to a divisor of 3 x the point batch). Their float32
            logits, (stats_chunk, H, W), are written and read back once per step, so a chunk that
            stays in the processor's cache is faster than a large one; chunks without an
            IoU-filter survivor are skipped, so a small chunk also wastes less on the last one.
        """
        grids = options.layer_grids()
        layers = []
        stride = 1 if options.mode == "exact" else options.fast_stride
        widest = None
        for i, (grid, n_crops) in enumerate(zip(grids, crops_per_layer(options.crop_n_layers))):
            ch, cw = bucket.layer_canvas(i, options.crop_overlap_ratio)
            long_side = bucket.layer_min_long_side(i, options.crop_overlap_ratio)
            band = band_for_long_side(image_size, long_side, block, stride)
            stats = Resize2d(-(-ch // stride), -(-cw // stride), band, band, stride)
            full_band = band_for_long_side(image_size, long_side, block)
            widest = full_band if widest is None or full_band.window > widest.window else widest
            n = len(grid)
            batch = min(options.points_per_batch, n)
            layers.append(LayerPlan(n_crops, n, batch, -(-n // batch) * batch, stats,
                                    largest_divisor(3 * batch, stats_chunk)))
        final = Resize2d(bucket.height, bucket.width, widest, widest)
        return cls(options, image_size, bucket, tuple(layers), final, mask_chunk)

    def grid_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer: (padded grid (n_padded, 2) float32, valid (n_padded,) bool)."""
        out = []
        for grid, layer in zip(self.options.layer_grids(), self.layers):
            g = np.zeros((layer.n_padded, 2), np.float32)
            g[: layer.n_points] = grid
            v = np.arange(layer.n_padded) < layer.n_points
            out.append((g, v))
        return out


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is <= ``at_most`` (at least 1)."""
    at_most = max(1, min(at_most, n))
    return max(d for d in range(1, at_most + 1) if n % d == 0)

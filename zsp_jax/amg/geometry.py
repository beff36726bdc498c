"""Point grids, crop boxes and size buckets of the automatic mask generator (host side, numpy).

The grids and crop boxes follow segment-anything's ``utils/amg.py`` (same points in the same
order, same integer crop boxes in the same order), written from its description:

* a layer grid of n x n points has coordinates ``linspace(1/(2n), 1 - 1/(2n), n)`` on each
  axis, listed row by row (x varies fastest);
* crop layer i >= 1 has n = 2**i crops per side that overlap by
  ``int(overlap_ratio * short_side * 2 / n)`` pixels; a crop is ``ceil((overlap*(n-1) + L) / n)``
  long and crop j starts at ``int((crop_len - overlap) * j)``; crops are listed x-major.

A **bucket** is a static padded image size: every image whose height and width round up to the
same multiple of ``AmgOptions.bucket`` shares one compiled program. The bucket also bounds the
sizes of the crops of every layer, which fixes the static canvas of each layer. A folder of
many sizes would compile one program per bucket; ``folder_buckets`` merges its buckets until
each program serves enough images (images keep their size: a larger canvas only pads them).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from zsp_jax.models.sam.transforms import resize_longest_side_shape


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float64 (x, y) points evenly spaced in [0, 1]^2, y-major (x varies fastest)."""
    if n_per_side < 1:
        raise ValueError(f"a point grid needs at least one point per side, got {n_per_side}")
    half = 1.0 / (2 * n_per_side)
    side = np.linspace(half, 1.0 - half, n_per_side)
    xs, ys = np.meshgrid(side, side, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def layer_point_grids(points_per_side: int, crop_n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per layer; layer i has int(points_per_side / downscale**i) points per side."""
    return [point_grid(int(points_per_side / downscale ** i)) for i in range(crop_n_layers + 1)]


def _crop_len(length: int, n: int, overlap: int) -> int:
    return int(math.ceil((overlap * (n - 1) + length) / n))


def _layer_overlap(short_side: int, n: int, ratio: float) -> int:
    return int(ratio * short_side * (2 / n))


def crop_boxes(image_hw: tuple[int, int], crop_n_layers: int, overlap_ratio: float
               ) -> tuple[list[list[int]], list[int]]:
    """Crop boxes [x0, y0, x1, y1] (ints, image frame) and their layer indices, in reference order.

    Layer 0 is the whole image; layer i >= 1 contributes (2**i)**2 crops.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    boxes, layers = [[0, 0, w, h]], [0]
    for i in range(1, crop_n_layers + 1):
        n = 2 ** i
        overlap = _layer_overlap(min(h, w), n, overlap_ratio)
        cw, ch = _crop_len(w, n, overlap), _crop_len(h, n, overlap)
        x0s = [int((cw - overlap) * j) for j in range(n)]
        y0s = [int((ch - overlap) * j) for j in range(n)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
                layers.append(i)
    return boxes, layers


def crops_per_layer(crop_n_layers: int) -> list[int]:
    """[1, 4, 16, ...]: crops in each layer."""
    return [4 ** i for i in range(crop_n_layers + 1)]


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A static image size class: images of (min_h..height) x (min_w..width) pixels.

    Attributes:
      height, width: the padded canvas of the full image (layer 0).
      min_height, min_width: the smallest image this bucket accepts; with ``height`` these bound
        the crop sizes of every layer, which fixes each layer's static canvas and the band width of
        the logit upsampling.
      min_long_side: the smallest longer side of an accepted image (0: implied by the minima). A
        letterbox bucket (``Bucket.letterbox``) takes portrait and landscape images whose longer
        side is the canvas side, so its minima are small but its long side is not.
    """

    height: int
    width: int
    min_height: int
    min_width: int
    min_long_side: int = 0

    @classmethod
    def letterbox(cls, side: int) -> "Bucket":
        """One canvas for every image resized to a longer side of exactly ``side`` pixels."""
        return cls(side, side, 1, 1, side)

    @classmethod
    def for_size(cls, image_hw: tuple[int, int], step: int) -> "Bucket":
        """The bucket of an (H, W) image: both sides rounded up to a multiple of ``step``."""
        h, w = int(image_hw[0]), int(image_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"empty image {h}x{w}")
        bh, bw = -(-h // step) * step, -(-w // step) * step
        return cls(bh, bw, max(1, bh - step + 1), max(1, bw - step + 1))

    def contains(self, image_hw: tuple[int, int]) -> bool:
        h, w = image_hw
        return (self.min_height <= h <= self.height and self.min_width <= w <= self.width
                and max(h, w) >= self.min_long_side)

    def layer_canvas(self, layer: int, overlap_ratio: float) -> tuple[int, int]:
        """Static (h, w) canvas that holds every crop of ``layer`` of every image in the bucket."""
        if layer == 0:
            return self.height, self.width
        n = 2 ** layer
        overlap = _layer_overlap(min(self.height, self.width), n, overlap_ratio)
        return _crop_len(self.height, n, overlap), _crop_len(self.width, n, overlap)

    def layer_min_long_side(self, layer: int, overlap_ratio: float) -> int:
        """A lower bound on the longer side of every crop of ``layer`` of every image in the bucket."""
        if layer == 0:
            return max(self.min_height, self.min_width, self.min_long_side)
        n = 2 ** layer
        overlap = _layer_overlap(min(self.min_height, self.min_width), n, overlap_ratio)
        long_side = max(_crop_len(self.min_height, n, overlap), _crop_len(self.min_width, n, overlap),
                        _crop_len(self.min_long_side, n, 0))
        return max(1, long_side - n)


def crop_plan(image_hw: tuple[int, int], crop_n_layers: int, overlap_ratio: float, image_size: int
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: (crop boxes (C_i, 4) int32 XYXY in the image frame, resized sizes (C_i, 2) int32 (h, w)).

    The resized size is the crop's size after ResizeLongestSide(image_size), i.e. the valid part
    of the encoder input.
    """
    boxes, layers = crop_boxes(image_hw, crop_n_layers, overlap_ratio)
    out = []
    for i in range(crop_n_layers + 1):
        b = np.asarray([bx for bx, li in zip(boxes, layers) if li == i], np.int32).reshape(-1, 4)
        sizes = np.asarray([resize_longest_side_shape(int(y1 - y0), int(x1 - x0), image_size)
                            for x0, y0, x1, y1 in b], np.int32).reshape(-1, 2)
        out.append((b, sizes))
    return out


def bucket_cost(bucket: Bucket, image_size: int) -> float:
    """The size-dependent work of one image in ``bucket``, up to a constant: its canvas times the band width
    of the logit upsampling (``zsp_jax.amg.upsample``), which grows as the bucket's shortest long side
    shrinks. The encoder and the prompt decoder cost the same for every image size."""
    from zsp_jax.amg.upsample import band_for_long_side

    band = band_for_long_side(image_size, bucket.layer_min_long_side(0, 0.0))
    return float(bucket.height * bucket.width * band.window)


def merge_buckets(a: Bucket, b: Bucket) -> Bucket:
    """The smallest bucket that accepts every image of ``a`` and of ``b``."""
    long_side = min(max(a.min_height, a.min_width, a.min_long_side), max(b.min_height, b.min_width, b.min_long_side))
    return Bucket(max(a.height, b.height), max(a.width, b.width), min(a.min_height, b.min_height),
                  min(a.min_width, b.min_width), long_side)


def folder_buckets(sizes: list[tuple[int, int]], step: int, min_images: int, image_size: int
                   ) -> dict[tuple[int, int], Bucket]:
    """A bucket for every image size of a folder, such that each bucket (one compiled program) serves at least
    ``min_images`` of its images (unless there are fewer images in all).

    Starts from ``Bucket.for_size(hw, step)`` of every size; while a bucket has fewer than
    ``min_images`` images, the one with the fewest (the smaller canvas on a tie) is merged with the
    bucket that adds the least work (``bucket_cost`` of the merged bucket times its images, minus
    the two buckets' own). So a folder of N images compiles at most max(1, N // min_images)
    programs. The result depends only on the list of sizes (every process of a job computes the same).

    Args:
      sizes: (H, W) of every image (repeats count).
      step: ``AmgOptions.bucket``.
      min_images: fewest images per bucket (1 keeps the buckets as they are).
      image_size: the SAM input side S.

    Returns:
      {(H, W): its bucket} for every distinct size.
    """
    counts: dict[Bucket, int] = {}
    natural = {hw: Bucket.for_size(hw, step) for hw in sizes}
    for hw in sizes:
        counts[natural[hw]] = counts.get(natural[hw], 0) + 1
    merged_into = {b: b for b in counts}

    def order(b: Bucket) -> tuple:
        return counts[b], b.height * b.width, b.height, b.width

    def added_cost(a: Bucket, b: Bucket) -> float:
        union = merge_buckets(a, b)
        return ((counts[a] + counts[b]) * bucket_cost(union, image_size) - counts[a] * bucket_cost(a, image_size)
                - counts[b] * bucket_cost(b, image_size))

    while len(counts) > 1:
        smallest = min(counts, key=order)
        if counts[smallest] >= min_images:
            break
        partner = min((b for b in counts if b != smallest), key=lambda b: (added_cost(smallest, b), order(b)))
        union = merge_buckets(smallest, partner)
        n = counts.pop(smallest) + counts.pop(partner)
        counts[union] = counts.get(union, 0) + n
        for original, current in merged_into.items():
            if current in (smallest, partner):
                merged_into[original] = union
    return {hw: merged_into[bucket] for hw, bucket in natural.items()}

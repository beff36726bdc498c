"""Options of the automatic mask generator: segment-anything's knobs plus the static-shape ones.

``AmgOptions`` holds every ``SamAutomaticMaskGenerator`` argument with the same name, default and
meaning, and the options that only a static-shape implementation needs (``mode``, ``max_masks``,
``bucket``). It is frozen and hashable, so it can be a static argument of ``jax.jit``: one
compiled program per (image-size bucket, options) pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MODES = ("exact", "fast")


@dataclasses.dataclass(frozen=True)
class AmgOptions:
    """Automatic mask generation settings.

    The first block is segment-anything's ``SamAutomaticMaskGenerator.__init__`` with the same
    semantics (defaults chosen there for ViT-H):

    Attributes:
      points_per_side: points along one side of the layer-0 grid (points_per_side**2 prompts);
        None when ``point_grids`` is given.
      points_per_batch: prompts decoded at once. Results do not depend on it; it bounds the
        memory of one decoder call (B images x points_per_batch x 3 masks at full resolution).
      pred_iou_thresh: keep masks whose predicted IoU is > this (no filter when <= 0).
      stability_score_thresh: keep masks whose stability score is >= this (no filter when <= 0).
      stability_score_offset: logit offset of the stability score's two thresholds.
      mask_threshold: logit threshold that binarises masks (the reference reads 0.0 from the model).
      box_nms_thresh: box IoU above which a mask is suppressed, within one crop.
      crop_n_layers: number of crop layers; layer i has (2**i)**2 crops.
      crop_nms_thresh: box IoU of the NMS across crops (smaller crops win).
      crop_overlap_ratio: overlap of neighbouring crops in layer 1, as a fraction of the short side.
      crop_n_points_downscale_factor: layer i uses int(points_per_side / factor**i) points per side.
      point_grids: explicit normalised (x, y) grids in [0, 1], one (P_i, 2) array per layer
        (stored as tuples of tuples so that the options stay hashable).
      min_mask_region_area: if > 0, fill holes and remove islands smaller than this (8-connected,
        as cv2), then NMS again with max(box_nms_thresh, crop_nms_thresh).
      output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".

    Static-shape options (zsp_jax only):
      mode: "exact" computes stability scores and boxes on every pixel of the full-resolution
        logits, as the reference does; "fast" computes them on every ``fast_stride``-th pixel of
        each axis (an estimate of the stability score, boxes up to fast_stride - 1 pixels inside
        the true ones for the filters and the NMS). Returned masks, areas and boxes are exact in
        both modes.
      fast_stride: subsampling of the fast mode's statistics (4: 1/16 of the pixels).
      max_masks: the most masks kept per image (and per crop before the cross-crop NMS); a
        warning is issued whenever more survive the NMS and the rest are dropped.
      bucket: images are padded to a multiple of this in height and width; one program is
        compiled per padded size (a bucket) and option set.
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: tuple[tuple[tuple[float, float], ...], ...] | None = None
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"
    mode: str = "exact"
    fast_stride: int = 4
    max_masks: int = 256
    bucket: int = 64

    def __post_init__(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        if self.point_grids is not None:
            grids = tuple(tuple((float(x), float(y)) for x, y in np.asarray(g, np.float64).reshape(-1, 2))
                          for g in self.point_grids)
            object.__setattr__(self, "point_grids", grids)
            if len(grids) < self.crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(grids)} grids; crop_n_layers={self.crop_n_layers} "
                                 f"needs {self.crop_n_layers + 1}")
            if any(len(g) == 0 for g in grids[: self.crop_n_layers + 1]):
                raise ValueError("point_grids contains an empty grid")
        elif self.points_per_side < 1 or any(
                int(self.points_per_side / self.crop_n_points_downscale_factor ** i) < 1
                for i in range(self.crop_n_layers + 1)):
            raise ValueError(f"points_per_side={self.points_per_side} leaves a crop layer without points")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {self.output_mode!r}; expected one of {OUTPUT_MODES}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        for name in ("points_per_batch", "max_masks", "bucket", "fast_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if self.output_mode == "coco_rle":
            import pycocotools.mask  # noqa: F401 - fail early, as the reference does
        if self.min_mask_region_area > 0:
            import cv2  # noqa: F401

    @classmethod
    def from_reference_kwargs(cls, **kwargs: Any) -> "AmgOptions":
        """Options from ``SamAutomaticMaskGenerator`` keyword arguments (numpy point_grids allowed)."""
        grids = kwargs.pop("point_grids", None)
        if grids is not None:
            kwargs["point_grids"] = tuple(tuple(map(tuple, np.asarray(g, np.float64))) for g in grids)
            kwargs.setdefault("points_per_side", None)
        return cls(**kwargs)

    def reference_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SamAutomaticMaskGenerator`` with the same settings."""
        names = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                 "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                 "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area", "output_mode")
        out = {n: getattr(self, n) for n in names}
        out["point_grids"] = None if self.point_grids is None else [np.asarray(g, np.float64)
                                                                    for g in self.point_grids]
        return out

    def replace(self, **changes: Any) -> "AmgOptions":
        return dataclasses.replace(self, **changes)

    @property
    def postprocess_nms_thresh(self) -> float:
        """The NMS threshold after small-region removal: max(box_nms_thresh, crop_nms_thresh)."""
        return max(self.box_nms_thresh, self.crop_nms_thresh)

    def layer_grids(self) -> list[np.ndarray]:
        """One (P_i, 2) float64 normalised (x, y) grid per crop layer."""
        from zsp_jax.amg.geometry import layer_point_grids

        if self.point_grids is not None:
            return [np.asarray(g, np.float64).reshape(-1, 2) for g in self.point_grids[: self.crop_n_layers + 1]]
        return layer_point_grids(self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor)

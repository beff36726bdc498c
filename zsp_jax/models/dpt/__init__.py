"""UniMatch V2's segmenter: DINOv2 encoder + DPT head (``DptSegmenter``), the head alone (``DptHead``),
complementary dropout, and the converter from UniMatch V2 checkpoints (``zsp_jax.models.dpt.convert``)."""

from zsp_jax.models.dpt.config import DptConfig, DptHeadConfig
from zsp_jax.models.dpt.head import DptHead
from zsp_jax.models.dpt.model import (BACKBONE_PARAMS, HEAD_PARAMS, DptSegmenter, complementary_dropout_mask,
                                      complementary_mask_from_half, param_group, param_group_labels)

__all__ = ["DptConfig", "DptHeadConfig", "DptHead", "DptSegmenter", "complementary_dropout_mask",
           "complementary_mask_from_half", "BACKBONE_PARAMS", "HEAD_PARAMS", "param_group", "param_group_labels"]

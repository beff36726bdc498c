"""DeepLabV3+ with ResNet-50/101 (deep or plain stem) and Xception-65 backbones, UniMatch's
feature perturbation, and converters from UniMatch / torchvision checkpoints."""

from zsp_jax.models.deeplab.config import DeepLabConfig
from zsp_jax.utils.resize import resize_bilinear_align_corners
from zsp_jax.models.deeplab.model import (BACKBONE_PARAMS, HEAD_PARAMS, DeepLabV3Plus, param_group,
                                          param_group_labels)

__all__ = ["DeepLabConfig", "DeepLabV3Plus", "BACKBONE_PARAMS", "HEAD_PARAMS", "param_group", "param_group_labels",
           "resize_bilinear_align_corners"]

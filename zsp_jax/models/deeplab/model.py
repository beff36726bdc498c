"""DeepLabV3+ (ASPP + decoder) with UniMatch's feature perturbation, NHWC, Flax NNX.

As UniMatch's ``model/semseg/deeplabv3plus.py``:

* ASPP on the high-level features c4: a 1x1 conv, three 3x3 convs dilated 6/12/18, image
  pooling (global average, 1x1 conv, BN, ReLU, broadcast back), each to 256 channels with BN
  and ReLU; concatenation projected by a 1x1 conv + BN + ReLU (no dropout).
* decoder: ASPP output resized (bilinear, align_corners=True) to the low-level features c1,
  c1 reduced by a 1x1 conv to 48 channels + BN + ReLU, concatenated, two 3x3 convs 256 + BN +
  ReLU, a 1x1 classifier with bias, and a resize to the input size (align_corners=True).
* ``need_fp=True``: the decoder runs once on the batch ``[clean; perturbed]`` where perturbed
  = channel dropout (``nn.Dropout2d(0.5)``) of c1 and of c4, so the head's BatchNorms see
  both halves together, as in UniMatch.

Parameter groups: UniMatch trains the backbone at the base learning rate and everything else
(ASPP, decoder, classifier) at 10x; ``BACKBONE_PARAMS`` / ``HEAD_PARAMS`` (NNX filters) and
``param_group_labels`` (a label tree for ``optax.multi_transform``) split them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zsp_jax.models.deeplab.config import DeepLabConfig
from zsp_jax.models.deeplab.layers import ChannelDropout, ConvBN, conv, torch_default_kernel_init
from zsp_jax.models.deeplab.resnet import ResNet
from zsp_jax.models.deeplab.xception import Xception
from zsp_jax.utils.resize import resize_bilinear_align_corners

Array = jax.Array

BACKBONE_PARAMS = nnx.All(nnx.Param, nnx.PathContains("backbone"))
HEAD_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling: (B, h, w, C_in) -> (B, h, w, channels)."""

    def __init__(self, in_ch: int, channels: int, rates: tuple[int, int, int], *, momentum: float, epsilon: float,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(momentum=momentum, epsilon=epsilon, kernel_init=torch_default_kernel_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.conv1x1 = ConvBN(in_ch, channels, 1, **kw)
        self.atrous = nnx.List([ConvBN(in_ch, channels, 3, dilation=r, **kw) for r in rates])
        self.pool = ConvBN(in_ch, channels, 1, **kw)
        self.project = ConvBN(5 * channels, channels, 1, **kw)

    def __call__(self, x: Array, *, train: bool) -> Array:
        b, h, w, _ = x.shape
        acc = jnp.promote_types(x.dtype, jnp.float32)
        pooled = self.pool(jnp.mean(x, axis=(1, 2), keepdims=True, dtype=acc).astype(x.dtype), train=train)
        branches = [self.conv1x1(x, train=train)] + [a(x, train=train) for a in self.atrous]
        # align_corners resize of a 1x1 map is a broadcast
        branches.append(jnp.broadcast_to(pooled, (b, h, w, pooled.shape[-1])))
        return self.project(jnp.concatenate(branches, axis=-1), train=train)


class DeepLabV3Plus(nnx.Module):
    """DeepLabV3+ with a ResNet or Xception-65 backbone.

    Call ``model(x, train=..., need_fp=...)`` with ``x`` (B, H, W, 3) float, normalised with the
    ImageNet mean/std (UniMatch's preprocessing). Returns logits (B, H, W, num_classes) fp32
    (fp64 for fp64 inputs), or with ``need_fp=True`` the pair (logits, logits_fp) of the clean
    and feature-perturbed decodes, both (B, H, W, num_classes).

    Train mode uses batch statistics in every BatchNorm and updates the running statistics
    (global over a sharded batch, i.e. SyncBN); eval mode uses the running statistics.
    The perturbation is applied whenever ``need_fp`` is set, in either mode, as UniMatch's is.
    """

    def __init__(self, config: DeepLabConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        """Builds the model with random weights.

        Args:
          config: the hyper-parameters (``DeepLabConfig.resnet101()``, ...).
          dtype: compute dtype (None: fp32; ``jnp.bfloat16`` for mixed precision). BatchNorm
            statistics are always computed and kept in fp32; logits are returned in fp32.
          param_dtype: parameter dtype.
          rngs: ``params`` for initialisation and ``dropout`` for the feature perturbation.
        """
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = ResNet(config, **kw) if config.backbone == "resnet" else Xception(config, **kw)
        head = dict(momentum=config.head_bn_momentum, epsilon=config.bn_epsilon,
                    kernel_init=torch_default_kernel_init, **kw)
        self.aspp = ASPP(config.high_level_in, config.aspp_channels, config.aspp_rates,
                         momentum=config.head_bn_momentum, epsilon=config.bn_epsilon, **kw)
        self.reduce = ConvBN(config.low_level_in, config.low_level_channels, 1, **head)
        fuse_in = config.aspp_channels + config.low_level_channels
        self.fuse = nnx.List([ConvBN(fuse_in, config.decoder_channels, 3, **head),
                              ConvBN(config.decoder_channels, config.decoder_channels, 3, **head)])
        self.classifier = conv(config.decoder_channels, config.num_classes, 1, bias=True,
                               kernel_init=torch_default_kernel_init, **kw)
        self.perturb = ChannelDropout(config.fp_dropout, rngs=rngs)

    def features(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        """Backbone features (c1 (B, H/4, W/4, C_low), c4 (B, H/os, W/os, C_high)) in the compute dtype."""
        return self.backbone(x, train=train)

    def decode(self, c1: Array, c4: Array, *, train: bool) -> Array:
        """ASPP + decoder at stride 4: (B, h1, w1, num_classes) logits in the compute dtype."""
        y = self.aspp(c4, train=train)
        y = resize_bilinear_align_corners(y, c1.shape[1:3])
        y = jnp.concatenate([self.reduce(c1, train=train), y], axis=-1)
        for layer in self.fuse:
            y = layer(y, train=train)
        return self.classifier(y)

    def __call__(self, x: Array, *, train: bool, need_fp: bool = False,
                 fp_masks: tuple[Array, Array] | None = None,
                 rngs: nnx.Rngs | Array | None = None) -> Array | tuple[Array, Array]:
        """Segmentation logits.

        Args:
          x: (B, H, W, 3) float, ImageNet-normalised.
          train: batch statistics (and running-statistic updates) vs running statistics.
          need_fp: also decode the channel-dropped features (UniMatch's feature perturbation).
          fp_masks: optional explicit keep-masks ``(mask_c1 (B, C_low), mask_c4 (B, C_high))``,
            bool or 0/1, instead of drawing them (for parity tests and reproducibility).
          rngs: optional ``nnx.Rngs`` or key for the masks, instead of the model's own
            ``dropout`` stream (whose counter then advances).

        Returns:
          logits (B, H, W, num_classes) fp32 (fp64 for fp64 x), or (logits, logits_fp) if ``need_fp``.
        """
        b, h, w, _ = x.shape
        out_dtype = jnp.promote_types(x.dtype, jnp.float32)
        c1, c4 = self.features(x, train=train)
        if not need_fp:
            return resize_bilinear_align_corners(self.decode(c1, c4, train=train), (h, w)).astype(out_dtype)
        if fp_masks is None:
            if isinstance(rngs, nnx.Rngs):
                rngs = rngs["dropout"]()
            if rngs is not None:
                k1, k4 = jax.random.split(rngs)
            else:
                k1 = k4 = None
            fp_masks = (self.perturb.sample_mask(b, c1.shape[-1], rngs=k1),
                        self.perturb.sample_mask(b, c4.shape[-1], rngs=k4))
        m1, m4 = fp_masks
        c1 = jnp.concatenate([c1, self.perturb(c1, m1)], axis=0)
        c4 = jnp.concatenate([c4, self.perturb(c4, m4)], axis=0)
        out = self.decode(c1, c4, train=train)
        out = resize_bilinear_align_corners(out, (h, w)).astype(out_dtype)
        return out[:b], out[b:]


def param_group(path: tuple[Any, ...]) -> str:
    """``"backbone"`` for a parameter path under ``backbone``, else ``"head"`` (ASPP, decoder, classifier)."""
    return "backbone" if path and str(path[0]) == "backbone" else "head"


def param_group_labels(params: Any) -> Any:
    """The tree of ``param_group`` labels of a parameter state (e.g. ``nnx.state(model, nnx.Param)``),
    with the same structure, for ``optax.multi_transform({"backbone": ..., "head": ...}, labels)``."""

    def label(path: tuple[Any, ...], _: Any) -> str:
        names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        return param_group(names)

    return jax.tree_util.tree_map_with_path(label, params)

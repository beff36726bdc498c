"""Conversion of UniMatch V2 checkpoints to zsp_jax's ``DptSegmenter`` (DINOv2 + DPT head).

Source: the ``latest.pth`` / ``best.pth`` files written by UniMatch V2's training scripts:

* ``unimatch_v2.py`` (and ``fixmatch.py``) save ``{"model": ..., "model_ema": ..., "optimizer": ...,
  "epoch", "previous_best", "previous_best_ema", "best_epoch", "best_epoch_ema"}``;
* ``supervised.py`` saves ``{"model": ..., "optimizer": ..., "epoch", "previous_best"}`` (no EMA).

Both state_dicts are taken from the ``DistributedDataParallel`` wrapper, so every key starts with
``module.`` (removed here): ``module.backbone.*`` (V2's DINOv2 in DINOv2's own key layout, converted
by ``zsp_jax.models.dinov2.convert``) and ``module.head.*`` (this module's ``head_rules``).
``entry`` picks the state_dict: ``"model_ema"``, the weights behind V2's reported numbers (its
training logs list ``MeanIoU`` and ``EMA`` per epoch, and the README's values are the best ``EMA``
ones, e.g. VOC 1464 ViT-B 90.80), or ``"model"``, the student. The default (``entry=None``) is
``model_ema`` when the file has it, else ``model`` (``supervised.py`` files have nothing else), as
the DINOv2 converter does. V2 writes ``best.pth`` when the *student's* mIoU is best, so its
``model_ema`` need not be the best EMA of the run.

Deliberately dropped: ``head.scratch.refinenet4.resConfUnit1.*`` (built by V2 but never run, see
``zsp_jax.models.dpt.head``). Every other tensor is consumed, every model weight produced and
every shape checked (``zsp_jax.utils.weights``). The encoder size and the number of classes are
read from the tensors; a requested config that disagrees is reported naming what differs.
``lock_backbone`` changes no tensor; it is a training option of the config (default False).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.dpt.config import DptConfig, DptHeadConfig
from zsp_jax.models.dpt.model import DptSegmenter
from zsp_jax.utils.weights import (ConversionError, Rule, build_with_weights, conv2d, conv_transpose2d,
                                   convert_state_dict, flat_shapes, load_weights, read_stored_config, save_weights)

MODEL_NAME = "unimatch_v2"
ENTRIES = ("model_ema", "model")
SOURCE_KEY = "zsp_jax.source"
ENTRY_KEY = "zsp_jax.source_entry"
_UNUSED_HEAD = r"scratch\.refinenet4\.resConfUnit1\.conv[12]\.(weight|bias)"


# ----------------------------------------------------------------------------- rule tables


def _conv(src: str, dst: str, *, bias: bool = True, transform: Any = conv2d) -> list[Rule]:
    rules = [Rule(src + r"\.weight", dst + ".kernel", transform)]
    return rules + [Rule(src + r"\.bias", dst + ".bias")] if bias else rules


def head_rules(src: str = "head.", dst: str = "head.") -> list[Rule]:
    """Rules from V2's ``DPTHead`` keys (after ``src``) to ``DptHead`` paths (after ``dst``)."""
    s, d = re.escape(src), dst
    rules = _conv(s + r"projects\.([0-3])", d + r"projects.\1")
    rules += _conv(s + r"resize_layers\.0", d + "upsample4", transform=conv_transpose2d)
    rules += _conv(s + r"resize_layers\.1", d + "upsample2", transform=conv_transpose2d)
    rules += _conv(s + r"resize_layers\.3", d + "downsample2")
    for level in range(1, 5):
        rules += _conv(s + rf"scratch\.layer{level}_rn", d + f"layer_rn.{level - 1}", bias=False)
        refine = s + rf"scratch\.refinenet{level}"
        if level < 4:  # refinenet4's resConfUnit1 never runs (dropped, see head_drop)
            rules += _conv(refine + r"\.resConfUnit1\.conv([12])", d + f"refine.{level - 1}.skip_unit.conv\\1")
        rules += _conv(refine + r"\.resConfUnit2\.conv([12])", d + f"refine.{level - 1}.unit.conv\\1")
        rules += _conv(refine + r"\.out_conv", d + f"refine.{level - 1}.out_conv")
    rules += _conv(s + r"scratch\.output_conv\.0", d + "output_conv1")
    rules += _conv(s + r"scratch\.output_conv\.2", d + "output_conv2")
    return rules


def head_drop(src: str = "head.") -> list[str]:
    """Source keys of V2's head that are deliberately not converted."""
    return [re.escape(src) + _UNUSED_HEAD]


def head_config_from_state_dict(sd: Mapping[str, Any], src: str = "head.", *,
                                source_name: str = "checkpoint") -> DptHeadConfig:
    """The ``DptHeadConfig`` a V2 head state_dict's shapes determine."""
    try:
        out_channels = tuple(int(sd[f"{src}projects.{i}.weight"].shape[0]) for i in range(4))
        embed_dim = int(sd[f"{src}projects.0.weight"].shape[1])
        features = int(sd[f"{src}scratch.layer1_rn.weight"].shape[0])
        num_classes = int(sd[f"{src}scratch.output_conv.2.weight"].shape[0])
    except KeyError as e:
        raise ConversionError(f"{source_name}: not a UniMatch V2 DPT head (no {e}; keys start with "
                              f"{sorted(sd)[:6]})") from None
    if any(k.startswith(f"{src}scratch.refinenet1.resConfUnit1.bn") for k in sd):
        raise ConversionError(f"{source_name}: the head has BatchNorms (use_bn=True), which UniMatch V2 never "
                              "uses and this model does not implement")
    return DptHeadConfig(num_classes=num_classes, embed_dim=embed_dim, features=features, out_channels=out_channels)


def _config_differences(found: Mapping[str, Any], want: Mapping[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key, value in found.items():
        if key not in want:
            continue
        if isinstance(value, Mapping):
            diffs += _config_differences(value, want[key], f"{prefix}{key}.")
        elif (tuple(value) if isinstance(value, (list, tuple)) else value) != \
                (tuple(want[key]) if isinstance(want[key], (list, tuple)) else want[key]):
            diffs.append(f"{prefix}{key}: the file has {value}, the config asks for {want[key]}")
    return diffs


def convert_head(sd: Mapping[str, Any], config: DptHeadConfig | None = None, *, src: str = "head.",
                 dst: str = "", source_name: str = "checkpoint") -> tuple[dict[str, np.ndarray], DptHeadConfig]:
    """Converts the ``src``-prefixed ``DPTHead`` tensors of ``sd`` (other keys ignored) to ``DptHead`` weights.

    Returns (weights keyed ``dst + "projects.0.kernel"`` etc., fp32 numpy; the head config read from
    the tensors, checked against ``config`` when given).
    """
    found = head_config_from_state_dict(sd, src, source_name=source_name)
    if config is not None:
        diffs = _config_differences(found.to_dict(), config.to_dict())
        if diffs:
            raise ConversionError(f"{source_name}: the DPT head does not fit the requested config:\n  "
                                  + "\n  ".join(diffs))
    head_sd = {k: v for k, v in sd.items() if k.startswith(src)}
    weights = convert_state_dict(head_sd, head_rules(src, dst), _head_shapes(found, dst), source_name=source_name,
                                 drop=head_drop(src))
    return weights, found


@functools.lru_cache(maxsize=16)
def _head_shapes(config: DptHeadConfig, dst: str) -> dict[str, jax.ShapeDtypeStruct]:
    from zsp_jax.models.dpt.head import DptHead

    shapes = flat_shapes(nnx.eval_shape(lambda: DptHead(config, rngs=nnx.Rngs(0))))
    return {dst + k: v for k, v in shapes.items()}


# ----------------------------------------------------------------------------- the whole segmenter


@functools.lru_cache(maxsize=16)
def model_shapes(config: DptConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Weight shapes of ``DptSegmenter(config)`` (DINOv2 encoder) without allocating it (cached per config)."""
    return flat_shapes(nnx.eval_shape(lambda: DptSegmenter(config, rngs=nnx.Rngs(0))))


@dataclasses.dataclass
class ConvertedDpt:
    """A converted V2 checkpoint: config, flat weights (``backbone.*`` / ``head.*`` NNX paths), provenance."""

    config: DptConfig
    weights: dict[str, np.ndarray]
    source: str
    entry: str | None = None

    def build(self, *, dtype: Any = None, param_dtype: Any = jnp.float32, attention: str = "auto") -> DptSegmenter:
        return build_segmenter(self.config, self.weights, source_name=self.source, dtype=dtype,
                               param_dtype=param_dtype, attention=attention)

    def save(self, path: str | os.PathLike) -> None:
        save_converted(path, self)


def convert_segmenter_state_dict(sd: Mapping[str, Any], config: DptConfig | None = None, *,
                                 allow_custom: bool = False, lock_backbone: bool = False,
                                 source_name: str = "state_dict", entry: str | None = None) -> ConvertedDpt:
    """Converts a V2 segmenter state_dict (``backbone.*`` + ``head.*``, ``module.`` already stripped).

    Args:
      sd: key -> torch tensor / numpy array.
      config: the model to convert to, checked against the tensors; None = read from them (the
        encoder must then be a named DINOv2 variant unless ``allow_custom``; a named one gets V2's
        block indices for its size).
      allow_custom: accept an encoder that is no named DINOv2 variant (``config`` None).
      lock_backbone: stored in the inferred config (no tensor records it).
      source_name: for error messages.
      entry: the V2 checkpoint entry the state_dict came from (recorded).

    Raises:
      ConversionError: not a V2 segmenter, a config that does not fit, or missing / extra /
        misshapen tensors (all listed).
    """
    from zsp_jax.models.dinov2.convert import convert_state_dict as convert_dinov2

    if not any(k.startswith("head.") for k in sd) or not any(k.startswith("backbone.") for k in sd):
        raise ConversionError(f"{source_name}: not a UniMatch V2 segmenter state_dict (it needs backbone.* and head.* "
                              f"tensors; keys start with {sorted(sd)[:6]})")
    encoder = convert_dinov2(sd, "unimatch_v2", variant=config.encoder if config is not None else None,
                             allow_custom=allow_custom, source_name=source_name, entry=entry)
    head_weights, head_config = convert_head(sd, config.head if config is not None else None, src="head.",
                                             dst="head.", source_name=source_name)
    if config is None:
        if head_config.embed_dim != encoder.config.embed_dim:
            raise ConversionError(f"{source_name}: the head reads {head_config.embed_dim} channels, the encoder "
                                  f"gives {encoder.config.embed_dim}")
        config = DptConfig(encoder=encoder.config, head=head_config, lock_backbone=lock_backbone)
    weights = {"backbone." + k: v for k, v in encoder.weights.items()}
    weights.update(head_weights)
    expected = model_shapes(config)
    if set(weights) != set(expected):  # the two converters together must give exactly the model's weights
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ConversionError(f"{source_name}: converted weights do not match the model: missing {missing[:6]}, "
                              f"extra {extra[:6]}")
    return ConvertedDpt(config, weights, source_name, entry)


def convert_checkpoint(source: str | os.PathLike, config: DptConfig | None = None, *, entry: str | None = None,
                       allow_custom: bool = False, lock_backbone: bool = False) -> ConvertedDpt:
    """Converts a UniMatch V2 checkpoint file (``latest.pth`` / ``best.pth``, or a bare segmenter state_dict).

    Args:
      source: the ``.pth`` file.
      config: as ``convert_segmenter_state_dict`` (None: read from the tensors).
      entry: ``"model_ema"`` or ``"model"``; None = ``model_ema`` when present, else ``model``
        (see the module docstring).
      allow_custom, lock_backbone: as ``convert_segmenter_state_dict``.

    Returns:
      the converted model (``.config``, ``.weights``, ``.entry``: the entry used).
    """
    from zsp_jax.models.dinov2.convert import read_checkpoint

    name = os.fspath(source)
    sd, fmt, used, _ = read_checkpoint(name, entry=entry)
    if fmt != "unimatch_v2":
        raise ConversionError(f"{name}: a DINOv2 encoder checkpoint ({fmt} layout), not a UniMatch V2 segmenter "
                              "(convert it with zsp_jax.models.dinov2.convert_checkpoint)")
    return convert_segmenter_state_dict(sd, config, allow_custom=allow_custom, lock_backbone=lock_backbone,
                                        source_name=name, entry=used)


def metadata(converted: ConvertedDpt) -> dict[str, str]:
    return {"zsp_jax.model": MODEL_NAME, "zsp_jax.variant": converted.config.variant,
            "zsp_jax.config": converted.config.to_json(), SOURCE_KEY: os.path.basename(converted.source),
            ENTRY_KEY: converted.entry or ""}


def save_converted(path: str | os.PathLike, converted: ConvertedDpt) -> None:
    """Writes ``.safetensors`` with ``zsp_jax.model = "unimatch_v2"`` and the config in the metadata (atomic)."""
    save_weights(path, converted.weights, metadata(converted))


def build_segmenter(config: DptConfig, weights: Mapping[str, np.ndarray], *, source_name: str, dtype: Any = None,
                    param_dtype: Any = jnp.float32, attention: str = "auto") -> DptSegmenter:
    """A ``DptSegmenter`` with ``weights`` loaded (strictly), without running random initialisers."""
    return build_with_weights(lambda: DptSegmenter(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                                   attention=attention),
                              weights, source_name=source_name, dtype=param_dtype)


def read_config(path: str | os.PathLike) -> DptConfig:
    """The ``DptConfig`` stored in a converted file, without reading the weights."""
    return read_stored_config(path, MODEL_NAME, DptConfig)


def load_model(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention: str = "auto", lock_backbone: bool | None = None, entry: str | None = None) -> DptSegmenter:
    """A ``DptSegmenter`` from a converted ``.safetensors`` file (no torch needed) or a V2 ``.pth``
    (converted in memory; needs torch).

    Args:
      path: the file.
      dtype / param_dtype: compute and storage dtypes (``DptSegmenter``).
      attention: the encoder's attention implementation (``Dinov2``).
      lock_backbone: overrides the stored config's flag (None: keep it).
      entry: for a ``.pth``: ``"model_ema"`` / ``"model"`` (``convert_checkpoint``).
    """
    name = os.fspath(path)
    if name.endswith(".safetensors"):
        weights, meta = load_weights(name, expect={"zsp_jax.model": MODEL_NAME})
        try:
            config = DptConfig.from_json(meta["zsp_jax.config"])
        except (KeyError, ValueError, TypeError) as e:
            raise ConversionError(f"{name}: no valid UniMatch V2 config in the file's metadata: {e}") from None
    else:
        converted = convert_checkpoint(name, entry=entry)
        weights, config = converted.weights, converted.config
    if lock_backbone is not None:
        config = config.replace(lock_backbone=lock_backbone)
    return build_segmenter(config, weights, source_name=name, dtype=dtype, param_dtype=param_dtype,
                           attention=attention)


__all__ = ["MODEL_NAME", "ENTRIES", "ConversionError", "ConvertedDpt", "head_rules", "head_drop",
           "head_config_from_state_dict", "convert_head", "convert_segmenter_state_dict", "convert_checkpoint",
           "save_converted", "build_segmenter", "read_config", "load_model", "model_shapes", "metadata"]

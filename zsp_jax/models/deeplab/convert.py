"""Conversion of PyTorch DeepLabV3+ / backbone checkpoints to zsp_jax DeepLabV3+ weights.

Accepted sources (a ``module.`` prefix, and nesting under ``model`` / ``state_dict``, are
removed first):

* ``unimatch_resnet``: UniMatch's ImageNet backbone files ``resnet50.pth`` / ``resnet101.pth``
  (deep stem: ``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``, ``conv1.6``, ``bn1``,
  ``layerN.i.*``; an ImageNet ``fc.*`` is dropped, as UniMatch's non-strict load ignores it);
* ``torchvision_resnet``: torchvision ResNet-50/101/152 state_dicts (``conv1``, ``bn1``,
  ``layerN.i.*``; the ImageNet classifier ``fc.*`` is dropped on purpose);
* ``unimatch_xception``: UniMatch's ``xception.pth`` (``conv1``, ``bn1``, ``conv2``, ``bn2``,
  ``blockN.*``, ``conv3``-``conv5``; keys containing ``itr`` / ``tmp`` are dropped, as UniMatch's
  loader does);
* ``unimatch_deeplab``: checkpoints written by UniMatch's training (``{'model': state_dict,
  'optimizer': ..., 'epoch': ..., 'previous_best': ...}``, keys ``backbone.*``, ``head.*``,
  ``reduce.*``, ``fuse.*``, ``classifier.*``), any of the backbones above.

Every source tensor is consumed or deliberately dropped (``num_batches_tracked`` everywhere),
every model weight is produced, every shape checked (``zsp_jax.utils.weights``). The backbone
kind, depth, stem and width (and the number of classes of a full checkpoint) are read from the
tensors; a requested config that disagrees is reported naming what differs. Output stride,
multi-grid and ASPP rates change no shape and cannot be read from a file: a UniMatch Cityscapes
checkpoint needs ``config=DeepLabConfig.cityscapes(...)`` (or the CLI's ``--output-stride 8
--multi-grid --aspp-rates 12 24 36``); the defaults are UniMatch's PASCAL VOC / COCO settings.

A backbone file gives only ``backbone.*`` weights: ``init_with_backbone`` puts them into a
freshly initialised model and says which parts stayed random (ASPP, decoder, classifier).
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

from zsp_jax.models.deeplab.config import RESNET_BLOCKS, DeepLabConfig
from zsp_jax.models.deeplab.model import DeepLabV3Plus
from zsp_jax.utils.weights import (ConversionError, Rule, build_with_weights, conv2d,
                                   convert_state_dict, flat_shapes, load_torch_checkpoint, load_weights,
                                   save_weights, unwrap_state_dict)

MODEL_NAME = "deeplabv3plus"
CONTENTS_KEY = "zsp_jax.contents"  # "full" or "backbone"
SOURCE_KEY = "zsp_jax.source"
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
_ALWAYS_DROPPED = (r".*num_batches_tracked",)


# ----------------------------------------------------------------------------- rule tables


def _esc(prefix: str) -> str:
    return re.escape(prefix)


def _conv_rule(src: str, dst: str) -> list[Rule]:
    """``src`` regex (may hold groups) of a torch conv -> ``dst`` template of an NNX conv."""
    return [Rule(src + r"\.weight", dst + ".kernel", conv2d)]


def _bn_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\." + t, dst + "." + f) for t, f in _BN]


def _conv_bn(src_conv: str, src_bn: str, dst: str) -> list[Rule]:
    return _conv_rule(src_conv, dst + ".conv") + _bn_rules(src_bn, dst + ".bn")


def resnet_rules(stem: str, src: str = "", dst: str = "backbone.") -> list[Rule]:
    """Rules for a ResNet with UniMatch's deep stem (``stem="deep"``) or torchvision's (``"plain"``)."""
    s, d = _esc(src), dst
    rules: list[Rule] = []
    if stem == "deep":
        rules += _conv_bn(s + r"conv1\.0", s + r"conv1\.1", d + "stem.0")
        rules += _conv_bn(s + r"conv1\.3", s + r"conv1\.4", d + "stem.1")
        rules += _conv_bn(s + r"conv1\.6", s + r"bn1", d + "stem.2")
    else:
        rules += _conv_bn(s + r"conv1", s + r"bn1", d + "stem.0")
    block = s + r"(layer[1-4])\.(\d+)\."
    rules += _conv_rule(block + r"conv([123])", d + r"\1.\2.conv\3")
    rules += _bn_rules(block + r"bn([123])", d + r"\1.\2.bn\3")
    rules += _conv_bn(block + r"downsample\.0", block + r"downsample\.1", d + r"\1.\2.downsample")
    return rules


def xception_rules(n_blocks: int, src: str = "", dst: str = "backbone.") -> list[Rule]:
    """Rules for UniMatch's Xception with ``n_blocks`` blocks (20 for Xception-65: 16 middle blocks)."""
    s, d = _esc(src), dst
    rules = _conv_bn(s + r"conv1", s + r"bn1", d + "stem.0") + _conv_bn(s + r"conv2", s + r"bn2", d + "stem.1")

    def sep(src_sep: str, dst_sep: str) -> list[Rule]:
        return (_conv_rule(src_sep + r"\.depthwise", dst_sep + ".depthwise")
                + _bn_rules(src_sep + r"\.bn1", dst_sep + ".depthwise_bn")
                + _conv_rule(src_sep + r"\.pointwise", dst_sep + ".pointwise")
                + _bn_rules(src_sep + r"\.bn2", dst_sep + ".pointwise_bn"))

    # block numbers are 1-based in UniMatch, our list is 0-based: one rule set per block index
    for n in range(1, n_blocks + 1):
        b, bd = s + rf"block{n}", d + f"blocks.{n - 1}"
        rules += _conv_bn(b + r"\.skip", b + r"\.skipbn", bd + ".skip")
        for k in (1, 2, 3):
            rules += sep(b + rf"\.sepconv{k}", bd + f".sepconv.{k - 1}")
    for k, name in enumerate(("conv3", "conv4", "conv5")):
        rules += sep(s + name, d + f"exit.{k}")
    return rules


def head_rules(src: str = "") -> list[Rule]:
    """Rules for UniMatch's ASPP (``head``), ``reduce``, ``fuse`` and ``classifier``."""
    s = _esc(src)
    rules = _conv_bn(s + r"head\.b0\.0", s + r"head\.b0\.1", "aspp.conv1x1")
    for i in (1, 2, 3):
        rules += _conv_bn(s + rf"head\.b{i}\.0", s + rf"head\.b{i}\.1", f"aspp.atrous.{i - 1}")
    rules += _conv_bn(s + r"head\.b4\.gap\.1", s + r"head\.b4\.gap\.2", "aspp.pool")
    rules += _conv_bn(s + r"head\.project\.0", s + r"head\.project\.1", "aspp.project")
    rules += _conv_bn(s + r"reduce\.0", s + r"reduce\.1", "reduce")
    rules += _conv_bn(s + r"fuse\.0", s + r"fuse\.1", "fuse.0")
    rules += _conv_bn(s + r"fuse\.3", s + r"fuse\.4", "fuse.1")
    rules += [Rule(s + r"classifier\.weight", "classifier.kernel", conv2d),
              Rule(s + r"classifier\.bias", "classifier.bias")]
    return rules


# ----------------------------------------------------------------------------- detection


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a checkpoint holds, read from its tensors.

    Attributes:
      format: ``unimatch_resnet``, ``torchvision_resnet``, ``unimatch_xception`` or ``unimatch_deeplab``.
      contents: ``"backbone"`` or ``"full"``.
      config: the ``DeepLabConfig`` fields the tensors determine (backbone kind, blocks, stem,
        width or Xception widths, and for a full checkpoint the number of classes, ASPP and
        decoder widths).
      backbone_format: the format of the backbone part (for ``unimatch_deeplab``).
    """

    format: str
    contents: str
    config: dict[str, Any]
    backbone_format: str

    def describe(self) -> str:
        c = self.config
        if c["backbone"] == "resnet":
            depth = {v: k for k, v in RESNET_BLOCKS.items()}.get(tuple(c["resnet_blocks"]))
            name = f"ResNet-{depth}" if depth else f"ResNet with blocks {tuple(c['resnet_blocks'])}"
            name += f" ({c['resnet_stem']} stem, width {c['resnet_width']})"
        else:
            name = f"Xception with {c['xception_middle']} middle blocks"
        if self.contents == "full":
            return f"a UniMatch DeepLabV3+ checkpoint on {name}, {c['num_classes']} classes"
        return f"a {self.format} backbone file: {name}"


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _detect_backbone(sd: Mapping[str, Any], prefix: str, source_name: str) -> tuple[str, dict[str, Any]]:
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    ks = set(keys)

    def sh(k: str) -> tuple[int, ...]:
        return _shape(sd, prefix + k)

    if "block1.sepconv1.depthwise.weight" in ks or "block1.skip.weight" in ks:
        blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"block(\d+)\.", k))})
        if not blocks or blocks != list(range(1, blocks[-1] + 1)) or len(blocks) < 4:
            raise ConversionError(f"{source_name}: Xception blocks are not numbered 1..N: {blocks[:8]}...")
        try:
            widths = (sh("conv1.weight")[0], sh("conv2.weight")[0],
                      *(sh(f"block{n}.sepconv3.pointwise.weight")[0] for n in (1, 2, 3, blocks[-1])),
                      sh("conv3.pointwise.weight")[0], sh("conv5.pointwise.weight")[0])
        except KeyError as e:
            raise ConversionError(f"{source_name}: an Xception checkpoint without {e} (truncated?)") from None
        return "unimatch_xception", {"backbone": "xception", "xception_widths": widths,
                                     "xception_middle": len(blocks) - 4}
    if "layer1.0.conv1.weight" in ks:
        if "layer1.0.conv3.weight" not in ks:
            raise ConversionError(f"{source_name}: a ResNet with basic blocks (ResNet-18/34); DeepLabV3+ here "
                                  "needs a bottleneck ResNet (50/101/152)")
        blocks = []
        for stage in (1, 2, 3, 4):
            idx = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
            blocks.append(max(idx) + 1 if idx else 0)
        if "conv1.0.weight" in ks:
            fmt, stem = "unimatch_resnet", "deep"
        elif "conv1.weight" in ks:
            fmt, stem = "torchvision_resnet", "plain"
        else:
            raise ConversionError(f"{source_name}: a ResNet checkpoint without a stem conv "
                                  "(neither conv1.weight nor conv1.0.weight; truncated?)")
        return fmt, {"backbone": "resnet", "resnet_blocks": tuple(blocks), "resnet_stem": stem,
                     "resnet_width": sh("layer1.0.conv1.weight")[0]}
    sample = sorted(keys)[:6]
    raise ConversionError(f"{source_name}: not a ResNet, Xception or DeepLabV3+ checkpoint (no 'layer1.0.conv1', "
                          f"'block1.*' or 'backbone.*' tensors; keys start with {sample})")


def detect_source(sd: Mapping[str, Any], *, source_name: str = "checkpoint") -> SourceInfo:
    """Reads the format and the architecture from an (unwrapped) state_dict's keys and shapes."""
    if any(k.startswith("backbone.") for k in sd):
        fmt, cfg = _detect_backbone(sd, "backbone.", source_name)
        try:
            cfg.update(num_classes=_shape(sd, "classifier.weight")[0],
                       aspp_channels=_shape(sd, "head.b0.0.weight")[0],
                       low_level_channels=_shape(sd, "reduce.0.weight")[0],
                       decoder_channels=_shape(sd, "fuse.0.weight")[0])
        except KeyError as e:
            raise ConversionError(f"{source_name}: a DeepLabV3+ checkpoint without {e} (truncated?)") from None
        return SourceInfo("unimatch_deeplab", "full", cfg, fmt)
    fmt, cfg = _detect_backbone(sd, "", source_name)
    return SourceInfo(fmt, "backbone", cfg, fmt)


def check_config(info: SourceInfo, config: DeepLabConfig, *, source_name: str) -> None:
    """Raises ``ConversionError`` naming every field where ``config`` disagrees with the tensors."""
    diffs = []
    for field, value in info.config.items():
        want = getattr(config, field)
        if (tuple(value) if isinstance(value, (list, tuple)) else value) != want:
            diffs.append(f"{field}: the file has {value}, the config asks for {want}")
    if diffs:
        raise ConversionError(f"{source_name}: {info.describe()} does not fit the requested model "
                              f"({config.variant}):\n  " + "\n  ".join(diffs))


def config_for(info: SourceInfo, base: DeepLabConfig | None = None, **overrides: Any) -> DeepLabConfig:
    """A config with the architecture the tensors determine, other fields from ``base`` / ``overrides``
    (e.g. ``num_classes`` for a backbone file, ``output_stride``)."""
    base = base or DeepLabConfig()
    return base.replace(**{**info.config, **overrides})


# ----------------------------------------------------------------------------- conversion


def convert(sd: Mapping[str, Any], config: DeepLabConfig, *, source_name: str = "checkpoint"
            ) -> tuple[dict[str, np.ndarray], SourceInfo]:
    """Converts an unwrapped torch state_dict to zsp_jax weights for ``config``.

    Args:
      sd: key -> torch tensor / array, prefixes already stripped (``unwrap_state_dict``).
      config: the target model; checked against the tensors (``check_config``).
      source_name: for error messages.

    Returns:
      (weights, info): ``{"backbone.layer1.0.conv1.kernel": array, ...}`` fp32 numpy arrays,
      all model weights for a full checkpoint, the ``backbone.*`` ones for a backbone file.

    Raises:
      ConversionError: the file is not a supported checkpoint, does not fit ``config``, or
        misses / has extra / mis-shaped tensors (all listed).
    """
    info = detect_source(sd, source_name=source_name)
    check_config(info, config, source_name=source_name)
    prefix = "backbone." if info.contents == "full" else ""
    if info.config["backbone"] == "xception":
        rules = xception_rules(info.config["xception_middle"] + 4, prefix)
    else:
        rules = resnet_rules(info.config["resnet_stem"], prefix)
    drop = list(_ALWAYS_DROPPED)
    if info.config["backbone"] == "resnet" and info.contents == "backbone":
        drop.append(r"fc\.(weight|bias)")  # the ImageNet classifier (torchvision's; UniMatch's files may keep it)
    if info.backbone_format == "unimatch_xception":
        drop.append(_esc(prefix) + r".*(itr|tmp).*")
    expected = dict(model_shapes(config))
    if info.contents == "full":
        rules = rules + head_rules()
    else:
        expected = {k: v for k, v in expected.items() if k.startswith("backbone.")}
    weights = convert_state_dict(sd, rules, expected, source_name=source_name, drop=drop)
    return weights, info


@functools.lru_cache(maxsize=16)
def model_shapes(config: DeepLabConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Weight shapes of ``DeepLabV3Plus(config)`` without allocating it (cached per config)."""
    return flat_shapes(nnx.eval_shape(lambda: DeepLabV3Plus(config, rngs=nnx.Rngs(0))))


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a ``.pth`` (weights_only) and unwraps ``model`` / ``state_dict`` and ``module.`` prefixes."""
    obj = load_torch_checkpoint(path)
    return unwrap_state_dict(obj, path=os.fspath(path))


def convert_file(path: str | os.PathLike, config: DeepLabConfig | None = None, *, num_classes: int | None = None,
                 output_stride: int = 16) -> tuple[dict[str, np.ndarray], DeepLabConfig, SourceInfo]:
    """Converts a PyTorch checkpoint file.

    Args:
      path: a ``.pth`` / ``.pt`` file of one of the formats in the module docstring.
      config: the model to convert to; None: inferred from the tensors, with ``num_classes``
        (required for a backbone file, checked for a full checkpoint) and ``output_stride``.

    Returns:
      (weights, config, info).
    """
    name = os.fspath(path)
    sd = read_torch_checkpoint(path)
    info = detect_source(sd, source_name=name)
    if config is None:
        overrides: dict[str, Any] = {"output_stride": output_stride}
        if info.contents == "backbone":
            if num_classes is None:
                raise ValueError(f"{name} is {info.describe()}: give num_classes for the (randomly initialised) head")
            overrides["num_classes"] = num_classes
        elif num_classes is not None and num_classes != info.config["num_classes"]:
            raise ConversionError(f"{name}: the checkpoint has {info.config['num_classes']} classes, "
                                  f"{num_classes} were asked for")
        config = config_for(info, **overrides)
    weights, info = convert(sd, config, source_name=name)
    return weights, config, info


# ----------------------------------------------------------------------------- converted files and loading


def save_converted(path: str | os.PathLike, weights: Mapping[str, np.ndarray], config: DeepLabConfig,
                   info: SourceInfo) -> None:
    """Writes converted weights as safetensors with the model config in the metadata."""
    save_weights(path, weights, {"zsp_jax.model": MODEL_NAME, "zsp_jax.variant": config.variant,
                                 "zsp_jax.config": config.to_json(), CONTENTS_KEY: info.contents,
                                 SOURCE_KEY: info.format})


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """Which weights came from the file and which parts of the model kept their random init."""

    loaded: tuple[str, ...]
    initialised: tuple[str, ...]

    @property
    def random_parts(self) -> tuple[str, ...]:
        """Top-level modules with random weights, e.g. ``("aspp", "classifier", "fuse", "reduce")``."""
        return tuple(sorted({k.split(".")[0] for k in self.initialised}))

    def summary(self) -> str:
        if not self.initialised:
            return f"all {len(self.loaded)} weights loaded"
        return (f"{len(self.loaded)} weights loaded; randomly initialised: {', '.join(self.random_parts)} "
                f"({len(self.initialised)} tensors)")


def init_with_backbone(config: DeepLabConfig, backbone_weights: Mapping[str, np.ndarray], *, rngs: nnx.Rngs,
                       dtype: Any = None, param_dtype: Any = jnp.float32,
                       source_name: str = "backbone weights") -> tuple[DeepLabV3Plus, LoadReport]:
    """A freshly initialised model (head at PyTorch's default init) with the backbone weights loaded.

    ``backbone_weights`` must hold exactly the model's ``backbone.*`` weights (as ``convert``
    returns for a backbone file). Returns (model, report); ``report.random_parts`` names what
    stays random (ASPP, decoder, classifier): train or fine-tune before use.
    """
    keys = (rngs.params(), rngs.dropout())

    def ctor(params_key: jax.Array, dropout_key: jax.Array) -> DeepLabV3Plus:
        return DeepLabV3Plus(config, dtype=dtype, param_dtype=param_dtype,
                             rngs=nnx.Rngs(params=params_key, dropout=dropout_key))

    abstract = nnx.eval_shape(lambda: ctor(*keys))
    shapes = flat_shapes(abstract)
    wanted = {k for k in shapes if k.startswith("backbone.")}
    missing = sorted(wanted - set(backbone_weights))
    extra = sorted(set(backbone_weights) - wanted)
    bad = sorted(k for k in wanted & set(backbone_weights)
                 if tuple(backbone_weights[k].shape) != tuple(shapes[k].shape))
    if missing or extra or bad:
        raise ConversionError(f"{source_name}: backbone weights do not fit {config.variant}: "
                              f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}, "
                              f"{len(bad)} mis-shaped {bad[:5]}")
    # Initialise only the head: inside one jit whose backbone initialisers XLA prunes (they
    # would be overwritten), which also spares one compilation per parameter shape.
    loaded = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.PathContains("backbone"))
    graphdef, backbone, _ = nnx.split(abstract, loaded, ...)
    rest = jax.jit(lambda pk, dk: nnx.split(ctor(pk, dk), loaded, ...)[2])(*keys)
    backbone = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), backbone)
    model = nnx.merge(graphdef, backbone, rest)
    current = nnx.state(model, loaded)
    for path, var in nnx.to_flat_state(current):
        key = ".".join(str(p) for p in path)
        var.set_value(jnp.asarray(backbone_weights[key], dtype=var.get_value().dtype))
    nnx.update(model, current)
    report = LoadReport(tuple(sorted(wanted)), tuple(sorted(set(shapes) - wanted)))
    return model, report


def load_model(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None, config: DeepLabConfig | None = None,
               num_classes: int | None = None, output_stride: int | None = None, dtype: Any = None,
               param_dtype: Any = jnp.float32) -> tuple[DeepLabV3Plus, LoadReport]:
    """Builds a DeepLabV3+ from a converted ``.safetensors`` file or directly from a PyTorch checkpoint.

    Args:
      path: ``.safetensors`` written by ``tools/convert_backbone.py`` / ``save_converted``, or a
        ``.pth`` / ``.pt`` of a supported format (converted in memory; needs torch).
      rngs: randomness for the head when the file holds only a backbone, and the ``dropout``
        stream of the feature perturbation (default ``nnx.Rngs(0)``).
      config: overrides the config stored in / inferred from the file (it is checked against it).
      num_classes, output_stride: overrides of the stored / inferred config (``num_classes`` is
        needed for a backbone ``.pth``).

    Returns:
      (model, report): ``report.random_parts`` is empty for a full checkpoint.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    name = os.fspath(path)
    overrides = {k: v for k, v in (("num_classes", num_classes), ("output_stride", output_stride)) if v is not None}
    if name.endswith(".safetensors"):
        weights, meta = load_weights(name, expect={"zsp_jax.model": MODEL_NAME})
        stored = DeepLabConfig.from_json(meta["zsp_jax.config"])
        contents = meta.get(CONTENTS_KEY, "full")
        if config is None:
            config = stored.replace(**overrides)
    else:
        weights, config, info = convert_file(name, config, num_classes=num_classes,
                                             output_stride=overrides.get("output_stride", 16))
        contents = info.contents
    if contents == "backbone":
        return init_with_backbone(config, weights, rngs=rngs, dtype=dtype, param_dtype=param_dtype, source_name=name)

    keys = (rngs.params(), rngs.dropout())  # concrete keys: build_with_weights jits the constructor

    def ctor() -> DeepLabV3Plus:
        return DeepLabV3Plus(config, dtype=dtype, param_dtype=param_dtype,
                             rngs=nnx.Rngs(params=keys[0], dropout=keys[1]))

    model = build_with_weights(ctor, weights, source_name=name, dtype=param_dtype)
    return model, LoadReport(tuple(sorted(weights)), ())


__all__ = ["ConversionError", "SourceInfo", "LoadReport", "convert", "convert_file", "detect_source", "check_config",
           "config_for", "read_torch_checkpoint", "save_converted", "init_with_backbone", "load_model",
           "resnet_rules", "xception_rules", "head_rules", "model_shapes"]

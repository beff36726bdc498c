"""Conversion of DINOv2 checkpoints to zsp_jax's ``Dinov2``, and loading converted files.

Three source formats, one rule table per key layout (``zsp_jax.utils.weights``: every tensor
consumed or deliberately dropped, every weight produced once, every shape checked):

* ``official``: DINOv2's released ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` (a plain
  state_dict: ``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
  ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
  ls2.gamma}.*`` or ``mlp.w12`` / ``mlp.w3`` for the SwiGLU of ViT-g, ``norm.*``). Checkpoints
  written with DINOv2's ``block_chunks > 0`` (``blocks.{chunk}.{i}.…``, ``BlockChunk``) are
  read too: the chunk level is dropped, the block index kept.
* ``hf``: transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``, as a directory
  (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, sharded or not; the head
  count comes from the config) or a state_dict file. Both key layouts are accepted: the files on
  the Hub (``attention.attention.query``, ``attention.output.dense``, ``mlp.weights_in`` / ``_out``)
  and transformers 5's in-memory names (``attention.q_proj`` .., ``mlp.gate_proj`` / ``up_proj`` /
  ``down_proj``).
* ``unimatch_v2``: a UniMatch V2 checkpoint (``unimatch_v2.py`` saves ``{"model": ..., "model_ema":
  ..., "optimizer": ..., "epoch": ...}``, the models wrapped in DDP, hence ``module.`` prefixes),
  or the bare segmenter state_dict. The encoder is ``backbone.*`` in the official layout; the DPT
  head's ``head.*`` tensors are dropped here (``zsp_jax.models.dpt.convert`` converts them).
  ``entry`` picks the model: by default ``model_ema`` when present (V2 evaluates both every epoch
  and its README reports the EMA model's mIoU, e.g. Pascal 1464 ViT-B 90.8 = the best EMA value of
  the training log), else ``model`` (``supervised.py`` saves no EMA). Note that V2 writes
  ``best.pth`` when the *non-EMA* model's mIoU is best.

The architecture is read from the tensors (``infer_config``): width from the class token,
depth from the block indices, the FFN kind and width, register tokens, the positional grid,
LayerScale. The head count does not show in any shape: DINOv2's heads are 64 wide in every
variant (S 6, B 12, L 16, g 24), so width / 64 is assumed unless the HF config or ``num_heads``
says otherwise. The positional-embedding resampling is not in the tensors either: DINOv2's rule
for the variant is used (offset 0.1 without antialias; 0.0 with antialias for registers), also
for transformers checkpoints (whose own resampling differs, see ``zsp_jax.references.dinov2``).
A file matching no named variant is refused unless ``allow_custom`` (a truncated file would
otherwise read as a shallower model); a requested ``variant`` that differs from the file is an
error naming the differing fields and tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.dinov2.config import VARIANTS, Dinov2Config, swiglu_hidden_dim
from zsp_jax.models.dinov2.model import Dinov2
from zsp_jax.utils.weights import (ConversionError, Rule, SafetensorsDict, build_with_weights, conv2d, flat_shapes,
                                   identity, linear, load_torch_checkpoint, load_weights, read_hf_state_dict,
                                   read_stored_config, save_weights, split, unwrap_state_dict)
# the Rule-table conversion, by another name: convert_state_dict is this module's own (DINOv2 state dicts)
from zsp_jax.utils.weights import convert_state_dict as convert_by_rules

MODEL_NAME = "dinov2"
FORMATS = ("official", "hf", "unimatch_v2")
V2_ENTRIES = ("model_ema", "model")
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
DINOV2_HEAD_DIM = 64

_NORM = [("weight", "scale", identity), ("bias", "bias", identity)]
_LINEAR = [("weight", "kernel", linear), ("bias", "bias", identity)]


def _module_rules(src: str, dst: str, kind: list[tuple[str, str, Any]]) -> list[Rule]:
    return [Rule(rf"{src}\.{s}", f"{dst}.{d}", t) for s, d, t in kind]


def official_rules(src: str = "", dst: str = "") -> list[Rule]:
    """DINOv2 key layout -> ``Dinov2`` state paths; ``src`` / ``dst`` prefix both sides (e.g. ``backbone.``)."""
    s, b = re.escape(src), rf"{re.escape(src)}blocks\.(\d+)"
    rules = [Rule(rf"{s}(cls_token|pos_embed|register_tokens|mask_token)", rf"{dst}\1"),
             Rule(rf"{s}patch_embed\.proj\.weight", f"{dst}patch_embed.proj.kernel", conv2d),
             Rule(rf"{s}patch_embed\.proj\.bias", f"{dst}patch_embed.proj.bias")]
    rules += _module_rules(rf"{s}norm", f"{dst}norm", _NORM)
    rules += _module_rules(rf"{b}\.(norm[12])", rf"{dst}blocks.\1.\2", _NORM)
    rules += [Rule(rf"{b}\.attn\.qkv\.weight", tuple(rf"{dst}blocks.\1.attn.{n}.kernel" for n in "qkv"),
                   split(3, then=linear)),
              Rule(rf"{b}\.attn\.qkv\.bias", tuple(rf"{dst}blocks.\1.attn.{n}.bias" for n in "qkv"), split(3)),
              Rule(rf"{b}\.(ls[12])\.gamma", rf"{dst}blocks.\1.\2.gamma"),
              Rule(rf"{b}\.mlp\.w12\.weight", (rf"{dst}blocks.\1.mlp.w1.kernel", rf"{dst}blocks.\1.mlp.w2.kernel"),
                   split(2, then=linear)),
              Rule(rf"{b}\.mlp\.w12\.bias", (rf"{dst}blocks.\1.mlp.w1.bias", rf"{dst}blocks.\1.mlp.w2.bias"),
                   split(2))]
    rules += _module_rules(rf"{b}\.attn\.proj", rf"{dst}blocks.\1.attn.proj", _LINEAR)
    rules += _module_rules(rf"{b}\.mlp\.(fc[12]|w3)", rf"{dst}blocks.\1.mlp.\2", _LINEAR)
    return rules


def hf_rules(src: str = "", dst: str = "") -> list[Rule]:
    """transformers DINOv2 key layouts (Hub files and transformers 5 names) -> ``Dinov2`` state paths."""
    e, b = rf"{re.escape(src)}embeddings", rf"{re.escape(src)}encoder\.layer\.(\d+)"
    rules = [Rule(rf"{e}\.(cls_token|register_tokens|mask_token)", rf"{dst}\1"),
             Rule(rf"{e}\.position_embeddings", f"{dst}pos_embed"),
             Rule(rf"{e}\.patch_embeddings\.projection\.weight", f"{dst}patch_embed.proj.kernel", conv2d),
             Rule(rf"{e}\.patch_embeddings\.projection\.bias", f"{dst}patch_embed.proj.bias"),
             Rule(rf"{b}\.layer_scale([12])\.lambda1", rf"{dst}blocks.\1.ls\2.gamma"),
             Rule(rf"{b}\.mlp\.weights_in\.weight", (rf"{dst}blocks.\1.mlp.w1.kernel", rf"{dst}blocks.\1.mlp.w2.kernel"),
                  split(2, then=linear)),
             Rule(rf"{b}\.mlp\.weights_in\.bias", (rf"{dst}blocks.\1.mlp.w1.bias", rf"{dst}blocks.\1.mlp.w2.bias"),
                  split(2))]
    rules += _module_rules(rf"{re.escape(src)}layernorm", f"{dst}norm", _NORM)
    rules += _module_rules(rf"{b}\.(norm[12])", rf"{dst}blocks.\1.\2", _NORM)
    for hub, hf5, ours in (("attention.attention.query", "attention.q_proj", "attn.q"),
                           ("attention.attention.key", "attention.k_proj", "attn.k"),
                           ("attention.attention.value", "attention.v_proj", "attn.v"),
                           ("attention.output.dense", "attention.o_proj", "attn.proj"),
                           ("mlp.fc1", None, "mlp.fc1"), ("mlp.fc2", None, "mlp.fc2"),
                           ("mlp.weights_out", "mlp.down_proj", "mlp.w3"),
                           (None, "mlp.gate_proj", "mlp.w1"), (None, "mlp.up_proj", "mlp.w2")):
        for name in (hub, hf5):
            if name is not None:
                rules += _module_rules(rf"{b}\.{re.escape(name)}", rf"{dst}blocks.\1.{ours}", _LINEAR)
    return rules


def unchunk_blocks(sd: Mapping[str, Any], prefix: str = "", *, source_name: str = "state_dict") -> dict[str, Any]:
    """``{prefix}blocks.{chunk}.{i}.…`` (DINOv2's ``BlockChunk`` layout) -> ``{prefix}blocks.{i}.…``; others as they are."""
    rx = re.compile(rf"({re.escape(prefix)}blocks\.)(\d+)\.(\d+)\.(.+)")
    out: dict[str, Any] = {}
    for k, v in sd.items():
        m = rx.fullmatch(k)
        key = f"{m.group(1)}{m.group(3)}.{m.group(4)}" if m else k
        if key in out:
            raise ConversionError(f"cannot convert {source_name}: {k} and another tensor are both {key}")
        out[key] = v
    return out


# ----------------------------------------------------------------------------- architecture from tensors

# key of each quantity per layout: (class token, positional embedding, registers, patch kernel,
# block prefix, mlp fc1 weight, swiglu fused/gate weight, layer scale)
_LAYOUT = {
    "official": dict(cls="cls_token", pos="pos_embed", reg="register_tokens", patch="patch_embed.proj.weight",
                     blocks="blocks.", fc1="blocks.0.mlp.fc1.weight", swiglu=("blocks.0.mlp.w12.weight", 2),
                     ls="blocks.0.ls1.gamma"),
    "hf": dict(cls="embeddings.cls_token", pos="embeddings.position_embeddings", reg="embeddings.register_tokens",
               patch="embeddings.patch_embeddings.projection.weight", blocks="encoder.layer.",
               fc1="encoder.layer.0.mlp.fc1.weight", swiglu=("encoder.layer.0.mlp.weights_in.weight", 2),
               swiglu_hf5=("encoder.layer.0.mlp.gate_proj.weight", 1), ls="encoder.layer.0.layer_scale1.lambda1"),
}


def _default_indices(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks ending at the last (V2's rule for S/B/g: 2, 5, 8, 11 of 12), for custom depths."""
    if depth < 4:
        return tuple(range(depth))
    return tuple(sorted({round((k + 1) * depth / 4) - 1 for k in range(4)}))


def infer_config(sd: Mapping[str, Any], fmt: str = "official", *, src: str = "", num_heads: int | None = None,
                 source_name: str = "state_dict") -> Dinov2Config:
    """The architecture of a DINOv2 state_dict from its tensor names and shapes.

    Args:
      sd: the state_dict (block chunks already removed, ``unchunk_blocks``).
      fmt: 'official' (also the ``backbone.`` part of UniMatch V2 files, with ``src``) or 'hf'.
      src: key prefix of the encoder.
      num_heads: attention heads (default: width / 64, DINOv2's head width).

    Returns:
      the named variant's config when the shapes are one (``VARIANTS``), else a "custom" one.

    Raises:
      ConversionError: a tensor the layout needs is missing, or the blocks are not 0..depth-1.
    """
    lay = _LAYOUT["hf" if fmt == "hf" else "official"]

    def shape(key: str) -> tuple[int, ...]:
        if src + key not in sd:
            raise KeyError(src + key)
        return tuple(int(d) for d in sd[src + key].shape)

    try:
        dim = shape(lay["cls"])[-1]
        tokens = shape(lay["pos"])[1]
        patch = shape(lay["patch"])[-1]
        registers = shape(lay["reg"])[1] if src + lay["reg"] in sd else 0
        rx = re.compile(re.escape(src + lay["blocks"]) + r"(\d+)\.")
        blocks = sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})
        if not blocks:
            raise KeyError(src + lay["blocks"] + "0.*")
        swiglu_keys = [lay["swiglu"], lay.get("swiglu_hf5")]
        swiglu = next(((k, parts) for k, parts in filter(None, swiglu_keys) if src + k in sd), None)
        if swiglu is not None:
            hidden = shape(swiglu[0])[0] // swiglu[1]
        else:
            hidden = shape(lay["fc1"])[0]
    except KeyError as e:
        keys = list(sd)
        raise ConversionError(f"cannot convert {source_name}: not a DINOv2 state_dict: it has no tensor "
                              f"{e.args[0]!r} ({len(keys)} tensors, e.g. {keys[:4]})") from None
    if blocks != list(range(len(blocks))):
        missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise ConversionError(f"cannot convert {source_name}: blocks {missing} are missing (truncated file?)")
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise ConversionError(f"cannot convert {source_name}: the positional embedding has {tokens} tokens, "
                              "not 1 + a square grid")
    heads = num_heads if num_heads is not None else max(dim // DINOV2_HEAD_DIM, 1)
    if dim % heads:
        raise ConversionError(f"cannot convert {source_name}: width {dim} is not divisible by {heads} heads")
    depth = len(blocks)
    if swiglu is not None:
        ratio = 4.0
        if swiglu_hidden_dim(dim, ratio) != hidden:
            raise ConversionError(f"cannot convert {source_name}: SwiGLU width {hidden} for width {dim} does not "
                                  f"follow DINOv2's rule (mlp_ratio 4 gives {swiglu_hidden_dim(dim, ratio)})")
        ffn = "swiglu"
    else:
        ratio, ffn = hidden / dim, "mlp"
    fields = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio, ffn=ffn, patch_size=patch,
                  pos_grid=grid, num_register_tokens=registers,
                  layer_scale_init=1.0 if src + lay["ls"] in sd else None)
    if registers:
        fields.update(interpolate_offset=0.0, interpolate_antialias=True)
    try:
        found = Dinov2Config(name="custom", intermediate_indices=_default_indices(depth), **fields)
    except ValueError as e:
        raise ConversionError(f"cannot convert {source_name}: inconsistent DINOv2 tensors: {e}") from None
    for name in VARIANTS:
        named = Dinov2Config.from_name(name)
        if named.architecture() == found.architecture():
            return named
    return found


def config_differences(found: Dinov2Config, expected: Dinov2Config) -> list[str]:
    """``["embed_dim: file 384, vit_b14 768", ...]`` for the fields that decide the weights' shapes."""
    a, b = found.architecture(), expected.architecture()
    diffs = [f"{k}: file {a[k]}, {expected.name} {b[k]}" for k in a if a[k] != b[k] and k != "num_heads"]
    if a["num_heads"] != b["num_heads"]:  # not in the tensors: the assumed or given count
        diffs.append(f"num_heads: {a['num_heads']} (width / 64 or as given), {expected.name} {b['num_heads']}")
    return diffs


def expected_shapes(config: Dinov2Config, dst: str = "") -> dict[str, Any]:
    """NNX state path -> ShapeDtypeStruct of every weight of ``Dinov2(config)`` (no allocation)."""
    shapes = flat_shapes(nnx.eval_shape(lambda: Dinov2(config, rngs=nnx.Rngs(0))))
    return {dst + k: v for k, v in shapes.items()}


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ConvertedDinov2:
    """A converted checkpoint: the architecture, flat weights (NNX state keys) and provenance.

    ``entry`` is the UniMatch V2 checkpoint entry the encoder came from (``model_ema`` /
    ``model``), or None.
    """

    config: Dinov2Config
    weights: dict[str, np.ndarray]
    source_format: str
    source: str
    entry: str | None = None

    def build(self, *, dtype: Any = jnp.float32, param_dtype: Any = None, attention: str = "auto") -> Dinov2:
        return build_dinov2(self.config, self.weights, source_name=self.source, dtype=dtype, param_dtype=param_dtype,
                            attention=attention)

    def save(self, path: str | os.PathLike) -> None:
        save_dinov2(path, self)


def _resolve_variant(variant: str | Dinov2Config | None) -> Dinov2Config | None:
    if variant is None or isinstance(variant, Dinov2Config):
        return variant
    try:
        return Dinov2Config.from_name(variant)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def convert_state_dict(sd: Mapping[str, Any], fmt: str = "official", *, variant: str | Dinov2Config | None = None,
                       allow_custom: bool = False, num_heads: int | None = None,
                       interpolate_offset: float | None = None, interpolate_antialias: bool | None = None,
                       source_name: str = "state_dict", entry: str | None = None) -> ConvertedDinov2:
    """Converts an in-memory state_dict (torch tensors or numpy arrays).

    Args:
      sd: 'official' or 'hf' key layout, or a UniMatch V2 segmenter state_dict ('unimatch_v2':
        ``backbone.*`` official keys plus ``head.*``, ``module.`` prefixes already stripped).
      fmt: one of ``FORMATS``.
      variant: a name (``vit_b14``, ``vit_b14_reg4``, ``base``, ...) or a ``Dinov2Config`` that the
        tensors must fit (the result then has that config: its indices and resampling rule);
        None = inferred.
      allow_custom: accept an architecture that is no named variant (when ``variant`` is None).
      num_heads: attention heads when the tensors' width is not 64 per head.
      interpolate_offset / interpolate_antialias: override the resampling rule of the result.
      source_name: names the source in error messages.
      entry: recorded in the result (the V2 checkpoint entry).

    Raises:
      ConversionError: not a DINOv2 state_dict, another variant than requested, an unknown
        architecture (without ``allow_custom``), or missing / extra / misshapen tensors.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    src = "backbone." if fmt == "unimatch_v2" else ""
    drop = [r"head\..*"] if fmt == "unimatch_v2" else []
    layout = "hf" if fmt == "hf" else "official"
    if layout == "official":
        sd = unchunk_blocks(sd, src, source_name=source_name)
    want = _resolve_variant(variant)
    found = infer_config(sd, layout, src=src, num_heads=num_heads, source_name=source_name)
    if want is not None and num_heads is None and found.embed_dim % want.num_heads == 0:
        # the head count is not in the tensors: take the requested one rather than width / 64
        found = dataclasses.replace(found, num_heads=want.num_heads)
    rules = hf_rules(src) if layout == "hf" else official_rules(src)
    if want is not None:
        diffs = config_differences(found, want)
        if diffs:
            headline = (f"cannot convert {source_name}: it holds a {found.variant_name()} model, not {want.name}; "
                        "differing fields:\n    " + "\n    ".join(diffs))
            # the differing shapes, from the shapes alone (zero-stride stand-ins: nothing is read)
            stand_ins = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
            try:
                convert_by_rules(stand_ins, rules, expected_shapes(want), source_name=source_name, drop=drop)
            except ConversionError as e:
                raise ConversionError(f"{headline}\n{e}") from None
            raise ConversionError(headline)
        config = want
    elif found.name == "custom" and not allow_custom:
        near = min((Dinov2Config.from_name(v) for v in VARIANTS), key=lambda v: len(config_differences(found, v)))
        raise ConversionError(
            f"cannot convert {source_name}: the tensors describe no DINOv2 variant ({', '.join(VARIANTS)}); nearest "
            f"is {near.name}, which differs in\n    " + "\n    ".join(config_differences(found, near))
            + "\n  (a truncated or modified checkpoint? pass allow_custom / --allow-custom to convert it anyway)")
    else:
        config = found
    overrides = {k: v for k, v in (("interpolate_offset", interpolate_offset),
                                   ("interpolate_antialias", interpolate_antialias)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    weights = convert_by_rules(sd, rules, expected_shapes(config), source_name=source_name, drop=drop)
    return ConvertedDinov2(config, weights, fmt, source_name, entry)


# ----------------------------------------------------------------------------- reading sources


def _detect_layout(sd: Mapping[str, Any], source_name: str) -> str:
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "unimatch_v2"
    if "embeddings.cls_token" in sd:
        return "hf"
    if "cls_token" in sd or any(k.startswith("blocks.") for k in keys):
        return "official"
    raise ConversionError(f"cannot convert {source_name}: not a DINOv2 checkpoint (no cls_token, "
                          f"embeddings.cls_token or backbone.* tensors; {len(keys)} tensors, e.g. {keys[:4]})")


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _read_hf_directory(directory: str) -> tuple[Mapping[str, Any], int | None]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json (not a transformers model directory)")
    try:
        with open(cfg_path) as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{cfg_path}: not a readable JSON config: {e}") from None
    if hf_config.get("model_type") not in HF_MODEL_TYPES:
        raise ConversionError(f"{cfg_path}: model_type is {hf_config.get('model_type')!r}, expected one of "
                              f"{HF_MODEL_TYPES}")
    return read_hf_state_dict(directory, "Dinov2Model"), hf_config.get("num_attention_heads")


def _numpy_scalar_globals() -> list[Any]:
    """numpy scalars and dtypes, for ``torch.serialization.safe_globals``.

    UniMatch V2 stores its best mIoU (``np.mean`` of the class IoUs, a ``numpy.float64``) beside the
    weights, which ``torch.load(weights_only=True)`` refuses unless these are allowed. They build
    plain numbers and dtypes; nothing else is admitted.
    """
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def _load_torch(path: str) -> Any:
    import torch

    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return load_torch_checkpoint(path)


def read_checkpoint(source: str | os.PathLike, *, entry: str | None = None
                    ) -> tuple[Mapping[str, Any], str, str | None, int | None]:
    """Reads any supported source.

    Args:
      source: a transformers directory, a ``.safetensors`` file, or a torch checkpoint.
      entry: for a UniMatch V2 checkpoint, 'model_ema' or 'model'; None = 'model_ema' when
        present, else 'model'.

    Returns:
      (state_dict, format, V2 entry used or None, head count from an HF config or None).
    """
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if entry is not None and entry not in V2_ENTRIES:
        raise ValueError(f"entry must be one of {V2_ENTRIES}, got {entry!r}")
    if os.path.isdir(source):
        sd, heads = _read_hf_directory(source)
        return sd, "hf", None, heads
    if source.endswith(".safetensors"):
        sd = dict(SafetensorsDict([source]))
        return sd, _detect_layout(sd, source), None, None
    obj = _load_torch(source)
    used = None
    if isinstance(obj, Mapping) and any(k in obj for k in V2_ENTRIES):
        present = [k for k in V2_ENTRIES if isinstance(obj.get(k), Mapping)]
        used = entry if entry is not None else (present[0] if present else None)
        if used not in present:
            raise ConversionError(f"cannot convert {source}: the checkpoint has no {used!r} entry "
                                  f"(entries: {sorted(obj)})")
        obj = obj[used]
    elif entry is not None:
        raise ConversionError(f"cannot convert {source}: entry {entry!r} asked for, but the file is not a "
                              f"UniMatch V2 checkpoint with 'model' / 'model_ema' entries")
    sd = _strip_module(unwrap_state_dict(obj, path=source))
    return sd, _detect_layout(sd, source), used, None


def convert_checkpoint(source: str | os.PathLike, *, variant: str | Dinov2Config | None = None,
                       entry: str | None = None, allow_custom: bool = False, num_heads: int | None = None,
                       interpolate_offset: float | None = None,
                       interpolate_antialias: bool | None = None) -> ConvertedDinov2:
    """Converts a DINOv2 checkpoint file or directory (format detected from its keys).

    Args:
      source: an official ``dinov2_*_pretrain.pth``, a transformers Dinov2 directory or state_dict
        file, or a UniMatch V2 checkpoint / segmenter state_dict.
      variant, allow_custom, num_heads, interpolate_offset, interpolate_antialias: as
        ``convert_state_dict``.
      entry: the V2 checkpoint entry (see ``read_checkpoint``); recorded in the result.

    Raises:
      FileNotFoundError, ConversionError: a missing, unreadable, truncated or foreign file, named
        in the message.
    """
    source = os.fspath(source)
    sd, fmt, used, hf_heads = read_checkpoint(source, entry=entry)
    return convert_state_dict(sd, fmt, variant=variant, allow_custom=allow_custom,
                              num_heads=num_heads if num_heads is not None else hf_heads,
                              interpolate_offset=interpolate_offset, interpolate_antialias=interpolate_antialias,
                              source_name=source, entry=used)


# ----------------------------------------------------------------------------- converted files


def metadata(converted: ConvertedDinov2) -> dict[str, str]:
    return {"zsp_jax.model": MODEL_NAME, "zsp_jax.variant": converted.config.variant_name(),
            "zsp_jax.config": converted.config.to_json(), "zsp_jax.source_format": converted.source_format,
            "zsp_jax.source": os.path.basename(os.fspath(converted.source)),
            "zsp_jax.source_entry": converted.entry or ""}


def save_dinov2(path: str | os.PathLike, converted: ConvertedDinov2) -> None:
    """Writes a converted model as ``.safetensors`` with its config in the metadata (atomic)."""
    save_weights(path, converted.weights, metadata(converted))


def build_dinov2(config: Dinov2Config, weights: Mapping[str, np.ndarray], *, source_name: str,
                 dtype: Any = jnp.float32, param_dtype: Any = None, attention: str = "auto") -> Dinov2:
    """A ``Dinov2`` with ``weights`` loaded, without running random initialisers.

    ``dtype`` is the compute dtype; ``param_dtype`` the storage dtype (default: float32, or
    ``dtype`` when that is bfloat16, which halves memory); ``attention`` as in ``Dinov2``.
    """
    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = param_dtype or (dtype if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32)
    return build_with_weights(
        lambda: Dinov2(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), attention=attention),
        weights, source_name=source_name, dtype=param_dtype)


def read_dinov2_config(path: str | os.PathLike) -> Dinov2Config:
    """The ``Dinov2Config`` stored in a converted file, without reading the weights."""
    return read_stored_config(path, MODEL_NAME, Dinov2Config)


def load_dinov2(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                attention: str = "auto") -> Dinov2:
    """Loads a file written by ``save_dinov2`` / ``tools/convert_dinov2.py``. Needs no torch.

    Args:
      path: the ``.safetensors`` file.
      dtype: compute dtype (float32 or bfloat16).
      param_dtype: weight storage dtype (see ``build_dinov2``).
      attention: the attention implementation (``Dinov2``).

    Returns:
      the model; its architecture is ``model.config``.
    """
    weights, meta = load_weights(path, expect={"zsp_jax.model": MODEL_NAME})
    try:
        config = Dinov2Config.from_json(meta["zsp_jax.config"])
    except (KeyError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: no valid DINOv2 config in the file's metadata: {e}") from None
    return build_dinov2(config, weights, source_name=os.fspath(path), dtype=dtype, param_dtype=param_dtype,
                        attention=attention)

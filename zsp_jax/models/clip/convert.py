"""Conversion of CLIP checkpoints (transformers, OpenAI, open_clip) to zsp_jax's ClipModel.

Three source formats, one rule table each (``zsp_jax.utils.weights``: every tensor consumed,
every target produced once, every shape checked):

* ``hf``: a transformers ``CLIPModel`` directory (``config.json`` plus ``model.safetensors`` or
  ``pytorch_model.bin``, sharded or not). The architecture and activation come from the config.
* ``openai``: an OpenAI CLIP ``.pt`` file (a TorchScript archive as distributed, or a plain
  ``state_dict`` saved with ``torch.save``). Weights are fp16 there; they are converted to fp32.
* ``open_clip``: an open_clip ``CLIP`` state_dict (``torch.save(model.state_dict())``, a
  training checkpoint ``{"state_dict": {"module.…"}}`` or a ``.safetensors`` file). Its key
  names are OpenAI's; a ``CustomTextCLIP`` (``text.…`` keys) is accepted as well.

OpenAI and open_clip checkpoints do not record the activation or the head count, and the
tensor shapes do not tell the head count. Heads follow CLIP's convention (width / 64, the rule
of OpenAI's builder and open_clip's default ``head_width``) except for the open_clip families
whose vision heads are wider (``VISION_HEAD_WIDTHS``: ViT-H 80, ViT-g 88, ViT-bigG 104, ViT-e
112), recognised from ``model_name``; a checkpoint whose vision width is one of those families'
and that comes without a model name is refused, since 64-wide heads would convert it silently
wrong. ``vision_head_width=`` (or an open_clip model-config JSON as ``model_name``) sets it for
any other model. The activation
defaults to ``quick_gelu`` for OpenAI files; for open_clip it is taken from the model name when
one is given (``ViT-B-16-quickgelu`` or pretrained tag ``openai`` -> quick_gelu; ``ViT-B-16`` ->
gelu; a model-config JSON's ``quick_gelu``); an open_clip state_dict without a model name is
refused (nothing in its tensors tells the two apart); ``act=`` overrides every rule.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.clip.config import ClipConfig
from zsp_jax.models.clip.model import ClipModel
from zsp_jax.utils.weights import (ConversionError, Rule, SafetensorsDict, build_with_weights, conv2d, flat_shapes,
                                   linear, load_torch_checkpoint, load_weights, read_hf_state_dict, read_stored_config,
                                   save_weights, split, unwrap_state_dict)
# the Rule-table conversion, by another name: convert_state_dict is this module's own (CLIP state dicts)
from zsp_jax.utils.weights import convert_state_dict as convert_by_rules

MODEL_NAME = "clip"
FORMATS = ("hf", "openai", "open_clip")


def _block_rules(src: str, dst: str, *, fused_qkv: bool) -> list[Rule]:
    """Rules of one tower's residual blocks; ``src``/``dst`` are key prefixes up to the index."""
    if fused_qkv:  # OpenAI / open_clip: nn.MultiheadAttention
        attn = [
            Rule(rf"{src}\.(\d+)\.attn\.in_proj_weight",
                 tuple(rf"{dst}.\1.attn.{n}.kernel" for n in "qkv"), split(3, then=linear)),
            Rule(rf"{src}\.(\d+)\.attn\.in_proj_bias", tuple(rf"{dst}.\1.attn.{n}.bias" for n in "qkv"), split(3)),
            Rule(rf"{src}\.(\d+)\.attn\.out_proj\.weight", rf"{dst}.\1.attn.out.kernel", linear),
            Rule(rf"{src}\.(\d+)\.attn\.out_proj\.bias", rf"{dst}.\1.attn.out.bias"),
        ]
        ln = {"ln_1": "ln_1", "ln_2": "ln_2"}
        mlp = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    else:  # transformers
        attn = [
            Rule(rf"{src}\.(\d+)\.self_attn\.(q|k|v|out)_proj\.weight", rf"{dst}.\1.attn.\2.kernel", linear),
            Rule(rf"{src}\.(\d+)\.self_attn\.(q|k|v|out)_proj\.bias", rf"{dst}.\1.attn.\2.bias"),
        ]
        ln = {"layer_norm1": "ln_1", "layer_norm2": "ln_2"}
        mlp = {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    rules = attn
    for s, d in ln.items():
        rules += [Rule(rf"{src}\.(\d+)\.{s}\.weight", rf"{dst}.\1.{d}.scale"),
                  Rule(rf"{src}\.(\d+)\.{s}\.bias", rf"{dst}.\1.{d}.bias")]
    for s, d in mlp.items():
        s = s.replace(".", r"\.")
        rules += [Rule(rf"{src}\.(\d+)\.{s}\.weight", rf"{dst}.\1.{d}.kernel", linear),
                  Rule(rf"{src}\.(\d+)\.{s}\.bias", rf"{dst}.\1.{d}.bias")]
    return rules


def _ln_rules(src: str, dst: str) -> list[Rule]:
    src = src.replace(".", r"\.")
    return [Rule(rf"{src}\.weight", f"{dst}.scale"), Rule(rf"{src}\.bias", f"{dst}.bias")]


OPENAI_RULES: tuple[Rule, ...] = tuple(
    [
        Rule(r"visual\.conv1\.weight", "visual.patch_embed", conv2d),
        Rule(r"visual\.class_embedding", "visual.class_embedding"),
        Rule(r"visual\.positional_embedding", "visual.pos_embed"),
        Rule(r"visual\.proj", "visual.proj"),
        Rule(r"token_embedding\.weight", "text.token_embedding.embedding"),
        Rule(r"positional_embedding", "text.pos_embed"),
        Rule(r"text_projection", "text.proj"),
        Rule(r"text_projection\.weight", "text.proj", linear),  # open_clip's nn.Linear variant
        Rule(r"logit_scale", "logit_scale"),
    ]
    + _ln_rules("visual.ln_pre", "visual.ln_pre")
    + _ln_rules("visual.ln_post", "visual.ln_post")
    + _ln_rules("ln_final", "text.ln_final")
    + _block_rules(r"visual\.transformer\.resblocks", "visual.blocks", fused_qkv=True)
    + _block_rules(r"transformer\.resblocks", "text.blocks", fused_qkv=True)
)
# Integers OpenAI's TorchScript model keeps beside the weights, and open_clip's causal mask.
OPENAI_DROP = (r"input_resolution", r"context_length", r"vocab_size", r"attn_mask", r"visual\.attn_mask")

HF_RULES: tuple[Rule, ...] = tuple(
    [
        Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embed", conv2d),
        Rule(r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
        Rule(r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
        Rule(r"visual_projection\.weight", "visual.proj", linear),
        Rule(r"text_model\.embeddings\.token_embedding\.weight", "text.token_embedding.embedding"),
        Rule(r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
        Rule(r"text_projection\.weight", "text.proj", linear),
        Rule(r"logit_scale", "logit_scale"),
    ]
    + _ln_rules("vision_model.pre_layrnorm", "visual.ln_pre")
    + _ln_rules("vision_model.post_layernorm", "visual.ln_post")
    + _ln_rules("text_model.final_layer_norm", "text.ln_final")
    + _block_rules(r"vision_model\.encoder\.layers", "visual.blocks", fused_qkv=False)
    + _block_rules(r"text_model\.encoder\.layers", "text.blocks", fused_qkv=False)
)
HF_DROP = (r".*position_ids",)


# ----------------------------------------------------------------------------- architecture inference


def _count_blocks(keys: Any, prefix: str) -> int:
    idx = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len({i for i in idx if i.isdigit()})


def config_from_openai_state_dict(sd: Mapping[str, Any], *, act: str, source_name: str,
                                  model_name: str | None = None, head_width: int | None = None) -> ClipConfig:
    """Reads the architecture of an OpenAI-layout CLIP ViT from its tensor shapes.

    The vision head count comes from ``head_width`` if given, else from ``vision_head_width``
    (model name rules); text heads are 64 wide in every OpenAI / open_clip ViT.
    """
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "positional_embedding",
            "token_embedding.weight", "ln_final.weight", "text_projection"]
    if "text_projection" not in sd and "text_projection.weight" in sd:
        need[-1] = "text_projection.weight"
    missing = [k for k in need if k not in sd]
    if missing:
        hint = ""
        if any(k.startswith("visual.layer1.") for k in sd):
            hint = " (a ResNet CLIP: only ViT models are supported)"
        elif any(k.startswith(("vision_model.", "text_model.")) for k in sd):
            hint = " (this looks like a transformers checkpoint: use format 'hf' on its directory)"
        raise ConversionError(f"cannot convert {source_name}: not an OpenAI/open_clip CLIP ViT state_dict, "
                              f"missing {missing}{hint}")
    shape = lambda k: tuple(sd[k].shape)  # noqa: E731
    width, _, patch, _ = shape("visual.conv1.weight")
    n_pos = shape("visual.positional_embedding")[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise ConversionError(f"cannot convert {source_name}: visual.positional_embedding has {n_pos} rows, "
                              f"not 1 + a square grid")
    text_width = shape("ln_final.weight")[0]
    tp = shape(need[-1])
    embed_dim = tp[1] if need[-1] == "text_projection" else tp[0]
    v_mlp = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0] \
        if "visual.transformer.resblocks.0.mlp.c_fc.weight" in sd else 4 * width
    t_mlp = shape("transformer.resblocks.0.mlp.c_fc.weight")[0] \
        if "transformer.resblocks.0.mlp.c_fc.weight" in sd else 4 * text_width
    if head_width is None:
        head_width = vision_head_width(model_name, width, source_name=source_name)
    elif head_width < 1 or width % head_width:
        raise ConversionError(f"cannot convert {source_name}: vision width {width} is not a multiple of the "
                              f"given head width {head_width}")
    return ClipConfig(
        embed_dim=embed_dim, image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."), vision_heads=width // head_width,
        vision_mlp_dim=v_mlp, context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0], text_width=text_width,
        text_layers=_count_blocks(sd, "transformer.resblocks."), text_heads=max(text_width // 64, 1),
        text_mlp_dim=t_mlp, act=act)


def config_from_hf(hf_config: Any) -> ClipConfig:
    """ClipConfig from a transformers ``CLIPConfig`` (object or dict)."""
    if isinstance(hf_config, Mapping):
        from transformers import CLIPConfig

        hf_config = CLIPConfig(**hf_config)
    v, t = hf_config.vision_config, hf_config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ConversionError(f"unsupported activations vision={v.hidden_act!r} text={t.hidden_act!r} "
                              f"(both must be 'gelu' or 'quick_gelu')")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ConversionError(f"different LayerNorm eps in the towers ({v.layer_norm_eps}, {t.layer_norm_eps})")
    return ClipConfig(
        embed_dim=hf_config.projection_dim, image_size=v.image_size, patch_size=v.patch_size,
        vision_width=v.hidden_size, vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
        vision_mlp_dim=v.intermediate_size, context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
        text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
        text_mlp_dim=t.intermediate_size, act=acts.pop(), layer_norm_eps=float(v.layer_norm_eps))


# open_clip model families whose vision tower uses ``head_width`` != 64 (open_clip's
# model_configs/*.json; tests/clip/convert_test.py checks this table against the installed files).
# (name prefix, vision width, head width); text towers of these families use 64-wide heads.
VISION_HEAD_WIDTHS = (("vit-h-", 1280, 80), ("vit-g-", 1408, 88), ("vit-bigg-", 1664, 104), ("vit-e-", 1792, 112))


def _family_name(model_name: str) -> str:
    """'ViT-H-14-quickgelu/laion2b_s32b_b79k' or 'hf-hub:.../ViT-H-14' -> 'vit-h-14-quickgelu'."""
    return model_name.split("/")[0].split(":")[-1].lower()


def vision_head_width(model_name: str | None, vision_width: int, *, source_name: str = "checkpoint") -> int:
    """Width of one vision attention head for an open_clip / OpenAI checkpoint.

    Args:
      model_name: an open_clip model name (``ViT-H-14``, ``ViT-bigG-14-quickgelu``, with or without
        a ``/pretrained`` tag), a path to an open_clip model-config JSON, or None.
      vision_width: the vision tower's width read from the tensors.

    Raises:
      ConversionError: the width is that of a wide-head family and no name says which, or the
        name's family does not fit the width.
    """
    if model_name and model_name.endswith(".json") and os.path.isfile(model_name):
        with open(model_name) as f:
            vision = json.load(f).get("vision_cfg", {})
        head = int(vision.get("head_width", 64))
    elif model_name:
        name = _family_name(model_name)
        head = next((h for prefix, _, h in VISION_HEAD_WIDTHS if prefix in name), 64)
    else:
        family = next((prefix for prefix, w, h in VISION_HEAD_WIDTHS if w == vision_width), None)
        if family is not None:
            raise ConversionError(
                f"cannot convert {source_name}: vision width {vision_width} is that of open_clip's "
                f"{family.rstrip('-').upper().replace('VIT', 'ViT')} models, whose attention heads are not 64 wide, and "
                f"the tensor shapes do not say which; pass the open_clip model name (--model-name ViT-H-14, "
                f"ViT-g-14, ViT-bigG-14, ...) or --vision-head-width")
        head = 64
    if vision_width % head:
        raise ConversionError(f"cannot convert {source_name}: vision width {vision_width} is not a multiple of the "
                              f"head width {head} of {model_name!r}; is the model name right?")
    return head


def act_from_open_clip_name(model_name: str | None) -> str:
    """open_clip's activation for a model name such as ``ViT-B-16-quickgelu`` or ``ViT-B-16/openai``.

    Names with ``quickgelu`` and OpenAI's pretrained weights use QuickGELU (open_clip loads
    ``openai`` weights with ``quick_gelu=True``); every other open_clip ViT config uses GELU.
    """
    if not model_name:
        return "gelu"
    if model_name.endswith(".json") and os.path.isfile(model_name):  # an open_clip model-config file
        with open(model_name) as f:
            return "quick_gelu" if json.load(f).get("quick_gelu") else "gelu"
    name = model_name.lower()
    return "quick_gelu" if ("quickgelu" in name or "openai" in name) else "gelu"


# ----------------------------------------------------------------------------- reading sources


def read_hf_directory(directory: str | os.PathLike) -> tuple[ClipConfig, Mapping[str, Any]]:
    """(config, state_dict) of a transformers CLIPModel directory; tensors are read lazily."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: format 'hf' expects a transformers model directory, not a file")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json (not a transformers model directory)")
    from transformers import CLIPConfig

    try:
        hf_config = CLIPConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{cfg_path}: not a CLIP config: {e}") from e
    if getattr(hf_config, "model_type", "clip") != "clip":
        raise ConversionError(f"{cfg_path}: model_type is {hf_config.model_type!r}, expected 'clip'")
    return config_from_hf(hf_config), read_hf_state_dict(directory, "CLIPModel")


def is_torchscript_archive(path: str) -> bool:
    """True for a ``torch.jit.save`` archive (it holds compiled ``code/``), False for ``torch.save``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def read_torch_file(path: str | os.PathLike) -> dict[str, Any]:
    """The state_dict in an OpenAI ``.pt`` (TorchScript or plain) or an open_clip checkpoint/safetensors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return dict(SafetensorsDict([path]))
    if is_torchscript_archive(path):
        import torch

        try:
            module = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: not a loadable TorchScript archive (truncated?): "
                                  f"{type(e).__name__}: {e}") from e
        return dict(module.state_dict())
    return unwrap_state_dict(load_torch_checkpoint(path), path=path)


def normalize_open_clip_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Maps open_clip ``CustomTextCLIP`` keys (``text.transformer…``) onto the CLIP layout."""
    if not any(k.startswith("text.") for k in sd):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("text."):
            k = k[len("text."):]
        out[k] = v
    return out


def detect_format(source: str | os.PathLike, state_dict: Mapping[str, Any] | None = None) -> str:
    """'hf' for a directory; 'openai' for a TorchScript archive or a state_dict holding OpenAI's
    ``input_resolution``; else 'open_clip'."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return "hf"
    if not os.path.exists(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if is_torchscript_archive(source) or (state_dict is not None and "input_resolution" in state_dict):
        return "openai"
    return "open_clip"


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ConvertedClip:
    """A converted checkpoint: the architecture, flat weights (NNX state keys) and provenance."""

    config: ClipConfig
    weights: dict[str, np.ndarray]
    source_format: str
    source: str

    def build(self, *, dtype: Any = jnp.float32, param_dtype: Any = None, attention: str = "auto") -> ClipModel:
        return build_clip(self.config, self.weights, source_name=self.source, dtype=dtype, param_dtype=param_dtype,
                          attention=attention)

    def save(self, path: str | os.PathLike) -> None:
        save_clip(path, self)


def expected_shapes(config: ClipConfig) -> dict[str, Any]:
    return flat_shapes(nnx.eval_shape(lambda: ClipModel(config)))


def convert_state_dict(sd: Mapping[str, Any], fmt: str, *, act: str | None = None, model_name: str | None = None,
                       hf_config: Any = None, source_name: str = "<state_dict>",
                       vision_head_width: int | None = None) -> ConvertedClip:
    """Converts an in-memory state_dict of the given format ('hf' needs ``hf_config``; see
    ``convert_checkpoint`` for ``model_name`` and ``vision_head_width``)."""
    if fmt == "hf":
        if hf_config is None:
            raise ValueError("format 'hf' needs the transformers CLIPConfig (hf_config=)")
        config = hf_config if isinstance(hf_config, ClipConfig) else config_from_hf(hf_config)
        if act is not None:
            config = dataclasses.replace(config, act=act)
        rules, drop = HF_RULES, HF_DROP
    elif fmt in ("openai", "open_clip"):
        sd = normalize_open_clip_keys(sd) if fmt == "open_clip" else dict(sd)
        default_act = "quick_gelu" if fmt == "openai" else act_from_open_clip_name(model_name)
        config = config_from_openai_state_dict(sd, act=act or default_act, source_name=source_name,
                                               model_name=model_name, head_width=vision_head_width)
        rules, drop = OPENAI_RULES, OPENAI_DROP
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    weights = convert_by_rules(sd, rules, expected_shapes(config), source_name=source_name, drop=drop)
    if fmt == "open_clip" and act is None and not model_name:
        # Nothing in an open_clip state_dict tells QuickGELU (OpenAI's weights) from GELU (open_clip's own):
        # a guess would give silently wrong features. (Checked after the tensors, whose errors come first.)
        raise ConversionError(
            f"{source_name}: an open_clip state_dict does not record its activation; give the open_clip model "
            f"name (--clip_model_name, config label.clip_model_name, or --model-name of tools/convert_clip.py), "
            f"e.g. ViT-B-16-quickgelu for OpenAI's weights (QuickGELU) or ViT-B-16 for open_clip's LAION / "
            f"DataComp weights (GELU)")
    return ConvertedClip(config, weights, fmt, source_name)


def convert_checkpoint(source: str | os.PathLike, *, fmt: str | None = None, act: str | None = None,
                       model_name: str | None = None, vision_head_width: int | None = None) -> ConvertedClip:
    """Converts a CLIP checkpoint file or directory.

    Args:
      source: a transformers CLIPModel directory, an OpenAI ``.pt`` file, or an open_clip
        checkpoint (``.pt``/``.bin``/``.safetensors``).
      fmt: 'hf', 'openai' or 'open_clip'; detected when None (directory -> hf; TorchScript
        archive or OpenAI's ``input_resolution`` entry -> openai; otherwise open_clip). A plain
        OpenAI ``state_dict`` without those entries has open_clip's layout: pass
        ``fmt='openai'`` (or ``act='quick_gelu'``) for the right activation.
      act: 'gelu' or 'quick_gelu' to override the format's rule (see the module docstring).
      model_name: open_clip model name, e.g. 'ViT-B-16-quickgelu' or 'ViT-H-14/laion2b_s32b_b79k' (decides
        the activation and, for ViT-H / g / bigG / e, the vision head width), or the path of an open_clip
        model-config JSON (its ``vision_cfg.head_width``).
      vision_head_width: width of one vision attention head, overriding the model-name rule.

    Raises:
      FileNotFoundError, ConversionError: a missing, unreadable, truncated or foreign file; the
        message lists every unmatched tensor, missing weight and shape mismatch.
    """
    source = os.fspath(source)
    if (fmt or detect_format(source)) == "hf":
        config, sd = read_hf_directory(source)
        return convert_state_dict(sd, "hf", act=act, hf_config=config, source_name=source)
    sd = read_torch_file(source)
    fmt = fmt or detect_format(source, sd)
    return convert_state_dict(sd, fmt, act=act, model_name=model_name, source_name=source,
                              vision_head_width=vision_head_width)


# ----------------------------------------------------------------------------- converted files


def save_clip(path: str | os.PathLike, converted: ConvertedClip) -> None:
    """Writes a converted model as ``.safetensors`` with its config in the metadata (atomic)."""
    save_weights(path, converted.weights, {
        "zsp_jax.model": MODEL_NAME,
        "zsp_jax.variant": converted.config.variant_name(),
        "zsp_jax.config": converted.config.to_json(),
        "zsp_jax.source_format": converted.source_format,
        "zsp_jax.source": os.path.basename(os.fspath(converted.source)),
    })


def build_clip(config: ClipConfig, weights: Mapping[str, np.ndarray], *, source_name: str,
               dtype: Any = jnp.float32, param_dtype: Any = None, attention: str = "auto") -> ClipModel:
    """A ClipModel with ``weights`` loaded, without running random initialisers.

    ``dtype`` is the compute dtype; ``param_dtype`` the storage dtype (default: float32, or
    ``dtype`` when that is bfloat16, which halves memory); ``attention`` the attention
    implementation (``ClipModel``).
    """
    param_dtype = param_dtype or (dtype if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32)
    ctor = lambda: ClipModel(config, dtype=dtype, param_dtype=param_dtype, attention=attention)  # noqa: E731
    return build_with_weights(ctor, weights, source_name=source_name, dtype=param_dtype)


def load_clip(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
              pos_embed_antialias: bool | None = None, attention: str = "auto") -> ClipModel:
    """Loads a file written by ``save_clip`` (or ``tools/convert_clip.py``). Needs no torch.

    Args:
      path: the ``.safetensors`` file.
      dtype: compute dtype (float32 or bfloat16).
      param_dtype: weight storage dtype (see ``build_clip``).
      pos_embed_antialias: override ``ClipConfig.pos_embed_antialias`` (default: as stored,
        True = open_clip / GEM resampling of the positional embedding).
      attention: attention implementation, ``"auto"`` | ``"xla"`` | ``"cudnn"`` | ``"einsum"``
        (``zsp_jax.models.attention``); not stored in the file.
    """
    weights, meta = load_weights(path, expect={"zsp_jax.model": MODEL_NAME})
    config = ClipConfig.from_json(meta["zsp_jax.config"])
    if pos_embed_antialias is not None:
        config = dataclasses.replace(config, pos_embed_antialias=pos_embed_antialias)
    return build_clip(config, weights, source_name=os.fspath(path), dtype=dtype, param_dtype=param_dtype,
                      attention=attention)


def read_clip_config(path: str | os.PathLike) -> ClipConfig:
    """The ClipConfig stored in a converted file, without reading the weights."""
    return read_stored_config(path, MODEL_NAME, ClipConfig)

"""segment-anything checkpoints -> zsp_jax SAM weights (safetensors), and loading them.

The rule table maps every tensor of a segment-anything ``Sam`` state_dict to the NNX state
path of ``zsp_jax.models.sam.Sam`` (our module names follow the reference's, so most rules
only rename ``weight`` to ``kernel`` / ``scale`` / ``embedding`` and transpose):

* Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> kernel (kh, kw, in, out);
* ConvTranspose2d (in, out, 2, 2) -> kernel (2, 2, in, out), unflipped (see
  ``layers.stride2_transpose_conv``, which paints 2x2 blocks directly);
* LayerNorm / LayerNorm2d weight -> scale; nn.Embedding weight -> embedding;
* the position embedding (already NHWC), the relative-position tables and the prompt
  encoder's Gaussian matrix are copied as they are;
* the reference's ``nn.Sequential`` indices (``neck.0``, ``mask_downscaling.3``,
  ``output_upscaling.1``) become named modules (``neck.conv1``, ``mask_downscaling.conv2``,
  ``output_upscaling.ln``).

The architecture is read from the tensors (``infer_config``): width and patch size from the
patch embedding, image size from the position embedding, depth from the block indices,
global-attention blocks from the relative-position table lengths, heads from the tables'
head dimension, and so on (the decoder's head count does not show in any shape; SAM's 8 is
assumed). A file that matches none of vit_b / vit_l / vit_h is refused
unless ``allow_custom`` (a truncated file would otherwise read as a shallower model), and a
requested variant that differs from the file is an error that names the differing fields and
the differing tensor shapes.

Memory: the checkpoint is memory-mapped and converted tensor by tensor; the converted arrays
(one fp32 copy of the model) are written with safetensors' zero-copy writer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.sam.config import VARIANTS, SamConfig
from zsp_jax.models.sam.model import Sam
from zsp_jax.utils.weights import (ConversionError, Rule, build_with_weights, conv2d, convert_state_dict, flat_shapes,
                                   identity, linear, load_torch_checkpoint, load_weights, save_weights,
                                   unwrap_state_dict)

MODEL_NAME = "sam"

# (source module regex, target module template, kind)
_MODULES: list[tuple[str, str, str]] = [
    (r"image_encoder\.patch_embed\.proj", r"image_encoder.patch_embed.proj", "conv"),
    (r"image_encoder\.blocks\.(\d+)\.(norm[12])", r"image_encoder.blocks.\1.\2", "norm"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)", r"image_encoder.blocks.\1.attn.\2", "linear"),
    (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])", r"image_encoder.blocks.\1.mlp.\2", "linear"),
    (r"image_encoder\.neck\.0", r"image_encoder.neck.conv1", "conv"),
    (r"image_encoder\.neck\.1", r"image_encoder.neck.ln1", "norm"),
    (r"image_encoder\.neck\.2", r"image_encoder.neck.conv2", "conv"),
    (r"image_encoder\.neck\.3", r"image_encoder.neck.ln2", "norm"),
    (r"prompt_encoder\.(point_embeddings\.\d+|not_a_point_embed|no_mask_embed)", r"prompt_encoder.\1", "embed"),
    (r"prompt_encoder\.mask_downscaling\.0", r"prompt_encoder.mask_downscaling.conv1", "conv"),
    (r"prompt_encoder\.mask_downscaling\.1", r"prompt_encoder.mask_downscaling.ln1", "norm"),
    (r"prompt_encoder\.mask_downscaling\.3", r"prompt_encoder.mask_downscaling.conv2", "conv"),
    (r"prompt_encoder\.mask_downscaling\.4", r"prompt_encoder.mask_downscaling.ln2", "norm"),
    (r"prompt_encoder\.mask_downscaling\.6", r"prompt_encoder.mask_downscaling.conv3", "conv"),
    (r"mask_decoder\.(iou_token|mask_tokens)", r"mask_decoder.\1", "embed"),
    (r"mask_decoder\.transformer\.(layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
     r"|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)", r"mask_decoder.transformer.\1.\2", "linear"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.(norm[1-4])", r"mask_decoder.transformer.layers.\1.\2", "norm"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])", r"mask_decoder.transformer.layers.\1.mlp.\2",
     "linear"),
    (r"mask_decoder\.transformer\.norm_final_attn", r"mask_decoder.transformer.norm_final_attn", "norm"),
    (r"mask_decoder\.output_upscaling\.0", r"mask_decoder.output_upscaling.conv1", "conv_transpose"),
    (r"mask_decoder\.output_upscaling\.1", r"mask_decoder.output_upscaling.ln", "norm"),
    (r"mask_decoder\.output_upscaling\.3", r"mask_decoder.output_upscaling.conv2", "conv_transpose"),
    (r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)",
     r"mask_decoder.\1.layers.\2", "linear"),
]

# Tensors copied as they are (no ``weight``/``bias`` suffix).
_PARAMS: list[str] = [
    r"image_encoder\.pos_embed",
    r"image_encoder\.blocks\.\d+\.attn\.rel_pos_[hw]",
    r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
]


def _unflipped_transpose_conv(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), not flipped."""
    return w.transpose(2, 3, 0, 1)


_WEIGHT = {
    "linear": ("kernel", linear),
    "conv": ("kernel", conv2d),
    "conv_transpose": ("kernel", _unflipped_transpose_conv),
    "norm": ("scale", identity),
    "embed": ("embedding", identity),
}


def sam_rules() -> list[Rule]:
    """The conversion table: segment-anything state_dict keys -> ``Sam`` NNX state paths."""
    rules = []
    for src, dst, kind in _MODULES:
        name, transform = _WEIGHT[kind]
        rules.append(Rule(src + r"\.weight", f"{dst}.{name}", transform))
        if kind != "embed":
            rules.append(Rule(src + r"\.bias", f"{dst}.bias"))
    rules += [Rule(f"({p})", r"\1") for p in _PARAMS]
    return rules


# ----------------------------------------------------------------------------- architecture from tensors


def _shape(sd: Mapping[str, Any], key: str, source_name: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyError(key)
    return tuple(int(s) for s in sd[key].shape)


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_config(sd: Mapping[str, Any], *, source_name: str = "state_dict") -> SamConfig:
    """Reads the architecture from the tensors' shapes and names.

    Returns a ``SamConfig`` named after the matching variant (vit_b / vit_l / vit_h) or
    "custom". Raises ``ConversionError`` if the tensors are not those of a SAM model.
    """
    try:
        dim, _, patch, _ = _shape(sd, "image_encoder.patch_embed.proj.weight", source_name)
        _, grid, _, _ = _shape(sd, "image_encoder.pos_embed", source_name)
        blocks = _indices(sd, "image_encoder.blocks.")
        if not blocks:
            raise KeyError("image_encoder.blocks.0.*")
        if blocks != list(range(len(blocks))):
            missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
            raise ConversionError(f"{source_name}: image encoder blocks {missing} are missing (truncated file?)")
        table = {i: _shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h", source_name) for i in blocks}
        head_dim = table[0][1]
        global_idx = tuple(i for i in blocks if table[i][0] == 2 * grid - 1)
        windowed = [table[i][0] for i in blocks if i not in global_idx]
        window = (windowed[0] + 1) // 2 if windowed else SamConfig().window_size
        hidden = _shape(sd, "image_encoder.blocks.0.mlp.lin1.weight", source_name)[0]
        prompt_dim = _shape(sd, "image_encoder.neck.0.weight", source_name)[0]
        mask_in = _shape(sd, "prompt_encoder.mask_downscaling.3.weight", source_name)[0]
        dec_layers = _indices(sd, "mask_decoder.transformer.layers.")
        dec_mlp = _shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight", source_name)[0]
        internal = _shape(sd, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
                          source_name)[0]
        mask_tokens = _shape(sd, "mask_decoder.mask_tokens.weight", source_name)[0]
        iou_layers = _indices(sd, "mask_decoder.iou_prediction_head.layers.")
        iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight", source_name)[0]
    except KeyError as e:
        keys = list(sd)
        raise ConversionError(
            f"{source_name}: not a segment-anything SAM state_dict: it has no tensor {e.args[0]!r} "
            f"({len(keys)} tensors, e.g. {keys[:4]})") from None
    fields = dict(image_size=grid * patch, patch_size=patch, encoder_dim=dim, encoder_depth=len(blocks),
                  encoder_heads=dim // head_dim if head_dim else 0, global_attn_indexes=global_idx,
                  window_size=window, mlp_ratio=hidden / dim, prompt_dim=prompt_dim, mask_in_chans=mask_in,
                  decoder_depth=len(dec_layers), decoder_mlp_dim=dec_mlp,
                  attention_downsample_rate=prompt_dim // internal if internal else 0,
                  num_multimask_outputs=mask_tokens - 1, iou_head_depth=len(iou_layers),
                  iou_head_hidden_dim=iou_hidden)
    for variant in VARIANTS:
        ref = SamConfig.from_name(variant)
        if all(getattr(ref, k) == v for k, v in fields.items()):
            return ref
    try:
        return SamConfig(name="custom", **fields)
    except ValueError as e:
        raise ConversionError(f"{source_name}: inconsistent SAM tensors: {e}") from None


def config_differences(found: SamConfig, expected: SamConfig) -> list[str]:
    """``["encoder_dim: file 1024, vit_b 768", ...]`` for the fields that decide weight shapes."""
    a, b = found.architecture(), expected.architecture()
    return [f"{k}: file {a[k]}, {expected.name} {b[k]}" for k in a if a[k] != b[k]]


def _nearest_variant(config: SamConfig) -> SamConfig:
    return min((SamConfig.from_name(v) for v in VARIANTS), key=lambda v: len(config_differences(config, v)))


def expected_shapes(config: SamConfig) -> dict[str, Any]:
    """NNX state path -> ShapeDtypeStruct of every weight of ``Sam(config)`` (no allocation)."""
    return flat_shapes(nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0))))


def convert_sam_state_dict(sd: Mapping[str, Any], *, variant: str | None = None, allow_custom: bool = False,
                           source_name: str = "state_dict") -> tuple[dict[str, np.ndarray], SamConfig]:
    """Converts a segment-anything ``Sam`` state_dict (torch tensors or numpy arrays).

    Args:
      sd: the state_dict (keys as in ``sam_model_registry[...]().state_dict()``).
      variant: "vit_b" / "vit_l" / "vit_h" to check the file against, or None to infer it.
      allow_custom: accept an architecture that is none of the three variants.
      source_name: names the source in error messages.

    Returns:
      (weights: NNX state path -> float32 numpy array, config).

    Raises:
      ConversionError: not a SAM state_dict, a different variant than requested, an unknown
        architecture (without ``allow_custom``), or missing / extra / misshapen tensors.
    """
    found = infer_config(sd, source_name=source_name)
    headline = None
    if variant is not None:
        config = SamConfig.from_name(variant)
        diffs = config_differences(found, config)
        if diffs:
            headline = (f"{source_name} holds a {found.name} model, not {variant}; differing fields:\n    "
                        + "\n    ".join(diffs))
    elif found.name == "custom" and not allow_custom:
        near = _nearest_variant(found)
        raise ConversionError(
            f"{source_name}: the tensors describe no SAM variant (vit_b / vit_l / vit_h); nearest is {near.name}, "
            "which differs in\n    " + "\n    ".join(config_differences(found, near))
            + "\n  (a truncated or modified checkpoint? To convert it anyway: --allow-custom of tools/convert_sam.py, "
            "or --config.label.sam_allow_custom=True for the labeller)")
    else:
        config = found
    if headline:
        # List the differing shapes from the shapes alone (zero-stride stand-ins): nothing is
        # read or converted for a file that cannot fit.
        stand_ins = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
        try:
            convert_state_dict(stand_ins, sam_rules(), expected_shapes(config), source_name=source_name)
        except ConversionError as e:
            raise ConversionError(f"{headline}\n{e}") from None
        raise ConversionError(headline)
    weights = convert_state_dict(sd, sam_rules(), expected_shapes(config), source_name=source_name)
    return weights, config


def metadata(config: SamConfig, source: str) -> dict[str, str]:
    return {"zsp_jax.model": MODEL_NAME, "zsp_jax.variant": config.name, "zsp_jax.config": config.to_json(),
            "zsp_jax.source": os.path.basename(source)}


def read_checkpoint(src: str | os.PathLike, *, variant: str | None = None,
                    allow_custom: bool = False) -> tuple[dict[str, np.ndarray], SamConfig]:
    """(converted weights, config) of a ``sam_vit_*.pth`` file (``convert_sam_state_dict`` of its state_dict)."""
    src = os.fspath(src)
    sd = unwrap_state_dict(load_torch_checkpoint(src), path=src)
    return convert_sam_state_dict(sd, variant=variant, allow_custom=allow_custom, source_name=src)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, variant: str | None = None,
                       allow_custom: bool = False) -> SamConfig:
    """``sam_vit_*.pth`` -> ``dst`` (.safetensors with the config in its metadata). Returns the config."""
    weights, config = read_checkpoint(src, variant=variant, allow_custom=allow_custom)
    save_weights(dst, weights, metadata(config, os.fspath(src)))
    return config


# ----------------------------------------------------------------------------- loading converted files


def load_sam(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             **model_kwargs: Any) -> tuple[Sam, SamConfig]:
    """Builds ``Sam`` from a converted ``.safetensors`` file (needs neither torch nor the checkpoint).

    Args:
      path: written by ``tools/convert_sam.py`` / ``convert_checkpoint``.
      dtype: compute dtype (float32, or bfloat16 for speed).
      param_dtype: weight storage dtype (float32 or bfloat16).
      **model_kwargs: further ``Sam`` arguments (``global_attn_chunk_bytes``, ``attention``).

    Returns:
      (model, config).
    """
    weights, meta = load_weights(path, expect={"zsp_jax.model": MODEL_NAME})
    try:
        config = SamConfig.from_json(meta["zsp_jax.config"])
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{path}: no valid SAM config in the file's metadata: {e}") from None
    model = build_with_weights(
        lambda: Sam(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **model_kwargs),
        weights, source_name=os.fspath(path), dtype=param_dtype)
    return model, config


def from_state_dict(sd: Mapping[str, Any], *, config: SamConfig | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, source_name: str = "state_dict", **model_kwargs: Any) -> Sam:
    """Builds ``Sam`` straight from a (torch or numpy) segment-anything state_dict, e.g. in tests."""
    if config is None:
        weights, config = convert_sam_state_dict(sd, allow_custom=True, source_name=source_name)
    else:
        weights = convert_state_dict(sd, sam_rules(), expected_shapes(config), source_name=source_name)
    return build_with_weights(
        lambda: Sam(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **model_kwargs),
        weights, source_name=source_name, dtype=param_dtype)

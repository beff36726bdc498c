"""PyTorch references for the DINOv2 encoder: transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``
resampling their positional embedding as DINOv2 does, and DINOv2's own checkpoint layout.

DINOv2 (facebookresearch/dinov2) has no installable package; transformers' port is the
well-kept PyTorch implementation, and computes the same blocks. It differs from DINOv2 in one
place, the resampling of the positional embedding to another patch grid:

* ``Dinov2Model`` calls ``F.interpolate(size=(gh, gw), mode="bicubic")``, whereas DINOv2 (and
  UniMatch V2's copy of it) calls ``F.interpolate(scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37))``:
  with a scale factor torch maps output to input coordinates with ``1 / s`` rather than
  ``37 / gh``, so the two differ at every grid but 37 x 37 (by ~3e-2 with random embeddings).
* ``Dinov2WithRegistersModel`` calls ``size=(gh, gw), antialias=True``, which is what DINOv2 does
  for its registers checkpoints (``interpolate_offset=0.0``, ``interpolate_antialias=True``).

``patch_interpolation`` replaces the embeddings' ``interpolate_pos_encoding`` with DINOv2's rule
(re-stated from ``DinoVisionTransformer.interpolate_pos_encoding``: its offset, antialias flag,
``scale_factor`` / ``size`` choice, output-size assertion and the "square 37 x 37 image: keep as
is" shortcut), so that the model is DINOv2 in every respect. ``official_state_dict`` writes the
weights with DINOv2's key names (fused ``qkv`` and ``w12``, ``ls1.gamma``, optionally in
``BlockChunk`` layout), as in the released ``dinov2_vit*14_pretrain.pth`` files and under
``backbone.`` in UniMatch V2's checkpoints. ``Dinov2Backbone`` adds DINOv2's
``get_intermediate_layers`` for the UniMatch V2 model reference.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsp_jax.models.dinov2.config import Dinov2Config
from zsp_jax.references.torch_utils import randomize_


def hf_config(config: Dinov2Config) -> Any:
    """transformers' ``Dinov2Config`` (or ``Dinov2WithRegistersConfig`` with registers) for ``config``.

    Eager attention (the plain softmax(q k^T / sqrt(d)) v), no dropout, LayerScale at
    ``config.layer_scale_init`` (transformers always has LayerScale).
    """
    from transformers import Dinov2Config as HfDinov2Config
    from transformers import Dinov2WithRegistersConfig

    if config.layer_scale_init is None:
        raise ValueError("transformers' DINOv2 always has LayerScale; give layer_scale_init")
    if config.mlp_ratio != int(config.mlp_ratio):
        raise ValueError(f"transformers' DINOv2 config takes an integer mlp_ratio, not {config.mlp_ratio}")
    kw = dict(hidden_size=config.embed_dim, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
              mlp_ratio=int(config.mlp_ratio), image_size=config.pretrain_image_size, patch_size=config.patch_size,
              layerscale_value=config.layer_scale_init, layer_norm_eps=config.layer_norm_eps,
              use_swiglu_ffn=config.ffn == "swiglu", hidden_act="gelu", qkv_bias=True,
              attn_implementation="eager")
    if config.num_register_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=config.num_register_tokens, **kw)
    return HfDinov2Config(**kw)


def hf_model(config: Dinov2Config, *, seed: int = 0, dinov2_interpolation: bool = True) -> Any:
    """A transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with every tensor randomised, eval mode.

    Args:
      config: architecture and resampling rule (``interpolate_offset`` / ``_antialias``).
      seed: of the construction and of ``randomize_``.
      dinov2_interpolation: patch the positional-embedding resampling to DINOv2's rule for
        ``config`` (``patch_interpolation``); False keeps transformers' own.
    """
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    cls = Dinov2WithRegistersModel if config.num_register_tokens else Dinov2Model
    model = randomize_(cls(hf_config(config)).eval(), seed=seed)
    if dinov2_interpolation:
        patch_interpolation(model, offset=config.interpolate_offset, antialias=config.interpolate_antialias)
    return model


def dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, num_tokens: int, height: int, width: int, *,
                                    patch_size: int, offset: float, antialias: bool) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding``: (1, 1 + M*M, C) embedding -> (1, 1 + gh*gw, C) for an H x W image.

    Args:
      pos_embed: the (1, 1 + M*M, C) parameter.
      num_tokens: 1 + number of patch tokens of the image (DINOv2's ``x.shape[1]`` before the
        registers are inserted).
      height, width: image size in pixels.
      patch_size: 14.
      offset: ``interpolate_offset``: > 0 -> ``scale_factor=((gh + offset) / M, (gw + offset) / M)``,
        0 -> ``size=(gh, gw)``.
      antialias: ``interpolate_antialias``.
    """
    n = pos_embed.shape[1] - 1
    if num_tokens - 1 == n and height == width:
        return pos_embed
    previous_dtype = pos_embed.dtype
    pos = pos_embed.float()
    side = int(math.sqrt(n))
    dim = pos.shape[-1]
    gh, gw = height // patch_size, width // patch_size
    if offset:
        resize = dict(scale_factor=(float(gh + offset) / side, float(gw + offset) / side))
    else:
        resize = dict(size=(gh, gw))
    grid = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **resize)
    assert (gh, gw) == tuple(grid.shape[-2:]), (gh, gw, grid.shape)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos[:, :1], grid), dim=1).to(previous_dtype)


def patch_interpolation(model: Any, *, offset: float = 0.1, antialias: bool = False) -> Any:
    """Makes a transformers DINOv2 model resample its positional embedding as DINOv2 does. Returns the model."""
    embeddings = model.embeddings
    patch = embeddings.patch_embeddings.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)

    def interpolate_pos_encoding(self: Any, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return dinov2_interpolate_pos_encoding(self.position_embeddings, tokens.shape[1], height, width,
                                               patch_size=patch, offset=offset, antialias=antialias)

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)
    return model


def hidden_states(model: Any, images_nhwc: np.ndarray) -> list[np.ndarray]:
    """[embeddings output, block 0 output, ..., block depth-1 output], each (B, T, C) float numpy.

    ``images_nhwc``: (B, H, W, 3) float32 normalised images (the layout of our models).
    """
    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


# ----------------------------------------------------------------------------- DINOv2's key layout


def official_state_dict(model: Any, *, block_chunks: int = 0) -> dict[str, torch.Tensor]:
    """The weights of a transformers DINOv2 model under DINOv2's key names.

    Args:
      model: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (transformers 5 names: ``q_proj`` ..,
        ``gate_proj`` / ``up_proj`` / ``down_proj``).
      block_chunks: 0 = ``blocks.{i}.…`` (the released checkpoints); k > 0 = DINOv2's
        ``BlockChunk`` layout ``blocks.{chunk}.{i}.…`` with depth / k blocks per chunk (training
        checkpoints built with ``block_chunks=k``).

    Returns:
      ``cls_token``, ``pos_embed``, ``register_tokens`` (registers only), ``mask_token``,
      ``patch_embed.proj.*``, ``blocks.*.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2
      | mlp.w12,mlp.w3,ls2.gamma}.*``, ``norm.*``: cloned tensors.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    depth = model.config.num_hidden_layers
    per_chunk = depth // block_chunks if block_chunks else depth

    def block(i: int) -> str:
        return f"blocks.{i // per_chunk}.{i}" if block_chunks else f"blocks.{i}"

    out: dict[str, torch.Tensor] = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "mask_token": sd.pop("embeddings.mask_token"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd.pop("embeddings.register_tokens")
    for i in range(depth):
        src, dst = f"encoder.layer.{i}", block(i)
        for t in ("weight", "bias"):
            out[f"{dst}.norm1.{t}"] = sd.pop(f"{src}.norm1.{t}")
            out[f"{dst}.norm2.{t}"] = sd.pop(f"{src}.norm2.{t}")
            out[f"{dst}.attn.qkv.{t}"] = torch.cat([sd.pop(f"{src}.attention.{n}_proj.{t}") for n in "qkv"])
            out[f"{dst}.attn.proj.{t}"] = sd.pop(f"{src}.attention.o_proj.{t}")
            if f"{src}.mlp.gate_proj.{t}" in sd:
                out[f"{dst}.mlp.w12.{t}"] = torch.cat([sd.pop(f"{src}.mlp.{n}_proj.{t}") for n in ("gate", "up")])
                out[f"{dst}.mlp.w3.{t}"] = sd.pop(f"{src}.mlp.down_proj.{t}")
            else:
                out[f"{dst}.mlp.fc1.{t}"] = sd.pop(f"{src}.mlp.fc1.{t}")
                out[f"{dst}.mlp.fc2.{t}"] = sd.pop(f"{src}.mlp.fc2.{t}")
        out[f"{dst}.ls1.gamma"] = sd.pop(f"{src}.layer_scale1.lambda1")
        out[f"{dst}.ls2.gamma"] = sd.pop(f"{src}.layer_scale2.lambda1")
    if sd:
        raise ValueError(f"tensors left unmapped: {sorted(sd)}")
    return out


class Dinov2Backbone(nn.Module):
    """A transformers DINOv2 model with DINOv2's ``embed_dim`` and ``get_intermediate_layers``.

    For the UniMatch V2 model reference (``zsp_jax.references.unimatch_v2_model.DPT(backbone=...)``).
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.embed_dim = model.config.hidden_size
        self.num_register_tokens = int(getattr(model.config, "num_register_tokens", 0))
        patch = model.config.patch_size
        self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else int(patch)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """DINOv2's ``get_intermediate_layers`` (NCHW input): outputs of blocks ``n`` (or the last n)."""
        states = self.model(x, output_hidden_states=True).hidden_states[1:]
        depth = len(states)
        take = range(depth - n, depth) if isinstance(n, int) else n
        outputs = [states[i] for i in range(depth) if i in take]
        assert len(outputs) == len(take), f"only {len(outputs)} / {len(take)} blocks found"
        if norm:
            outputs = [self.model.layernorm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        outputs = [o[:, 1 + self.num_register_tokens:] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            outputs = [o.reshape(b, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                       for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).last_hidden_state

"""Shared by the V2 trainer tests: the tiny DINOv2 + DPT model on both sides (PyTorch reference and ours,
same weights), moving reference tensors to our names and layouts, and flat views of our states.

The tiny encoder's positional grid is 3 x 3 and the crops 42 px (3 x 3 patches), so the embedding is
used as stored, as in V2's training (518 px crops on DINOv2's 37 x 37 grid); the resampling path is
covered by ``tests/dinov2`` and ``tests/dpt``.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from tests.dpt.helpers import dinov2_reference, v2_state_dict
from zsp_jax.models.dinov2.config import Dinov2Config
from zsp_jax.models.dpt import DptConfig, DptHeadConfig
from zsp_jax.models.dpt.convert import build_segmenter, convert_segmenter_state_dict

_ENCODER = Dinov2Config.tiny(intermediate_indices=(0, 1, 2, 3), pos_grid=3)
CONFIG = DptConfig(encoder=_ENCODER, head=DptHeadConfig.tiny(embed_dim=_ENCODER.embed_dim))
SIZE = 42  # = pos_grid * 14
LOGIT_SCALE = 40.0
# jax.jit(..., compiler_options=FAST_COMPILE): the same HLO, LLVM at -O0, which halves XLA:CPU's compile time
# (compilation dominates these tests); the programs then round a little differently, so every comparison
# of two of our programs (1 vs 8 devices) compiles both with it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def reference(config: DptConfig = CONFIG, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              lock_backbone: bool = False, logit_scale: float = LOGIT_SCALE) -> torch.nn.Module:
    """V2's ``DPT`` on the DINOv2 reference, every tensor randomised, in ``dtype``.

    The classifier (the head's last conv) is scaled by ``logit_scale``: the randomised model's logits are
    nearly uniform over the classes, and a confidence threshold would then count all pixels or none.

    In float64 the positional embedding is rounded to float32 where it enters the tokens, as our
    encoder computes it (``Dinov2.positional_embedding`` works in float32 like DINOv2's resampling;
    DINOv2 skips the cast when it does not resample). A method, not a closure: ``deepcopy`` (the EMA
    teacher) rebinds it to the copy's own embedding.
    """
    ref = dinov2_reference(config, seed).to(dtype)
    with torch.no_grad():
        for p in ref.head.scratch.output_conv[2].parameters():
            p.mul_(logit_scale)
    if dtype == torch.float64:
        embeddings = ref.backbone.model.embeddings
        dinov2_rule = embeddings.interpolate_pos_encoding.__func__

        def rounded(self: Any, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
            return dinov2_rule(self, tokens, height, width).float().to(tokens.dtype)

        embeddings.interpolate_pos_encoding = types.MethodType(rounded, embeddings)
    if lock_backbone:
        ref.lock_backbone()
    return ref


def as_ours(ref: torch.nn.Module, config: DptConfig = CONFIG) -> dict[str, np.ndarray]:
    """The reference's tensors under our parameter names and layouts, through the V2 converter, float64.

    The converter writes float32; float64 values go through it as two float32 parts (hi + lo, both
    moved exactly by its transposes and concatenations) and are summed again (about 48 bits).
    """
    sd = {k: v.detach().double() for k, v in v2_state_dict(ref).items()}
    hi = {k: v.float() for k, v in sd.items()}
    lo = {k: (v - hi[k].double()).float() for k, v in sd.items()}
    w_hi = convert_segmenter_state_dict(hi, config, source_name="reference").weights
    w_lo = convert_segmenter_state_dict(lo, config, source_name="reference").weights
    return {k: w_hi[k].astype(np.float64) + w_lo[k].astype(np.float64) for k in w_hi}


def grads_as_ours(ref: torch.nn.Module, config: DptConfig = CONFIG) -> dict[str, np.ndarray]:
    """The reference's ``.grad`` (None -> 0) under our names: a copy holding them as its weights."""
    holder = copy.deepcopy(ref)
    with torch.no_grad():
        for p, src in zip(holder.parameters(), ref.parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    return as_ours(holder, config)


def ours_from(ref: torch.nn.Module, config: DptConfig = CONFIG, *, param_dtype: Any = jnp.float32,
              dtype: Any = None) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params) of our ``DptSegmenter`` with the reference's weights (call under x64 for float64)."""
    model = build_segmenter(config, as_ours(ref, config), source_name="reference", param_dtype=param_dtype,
                            dtype=dtype)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def flat(tree: Any) -> dict[str, np.ndarray]:
    """An ``nnx.State`` as ``{"backbone.blocks.0.attn.k.bias": array}``."""
    return {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(tree)}


def attention_in_input_precision(query: jax.Array, key: jax.Array, value: jax.Array, *, attention: str,
                                 scale: float, **_: Any) -> jax.Array:
    """softmax(scale q k^T) v in the inputs' dtype ((B, T, N, H) operands), for the float64 comparisons:
    ``zsp_jax.models.attention`` computes logits and softmax in float32 by design, which would cap a
    float64 comparison at float32 rounding (and Adam turns gradient rounding at its eps into update
    differences)."""
    logits = jnp.einsum("btnh,bsnh->bnts", query, key) * scale
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), value)

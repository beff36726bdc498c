"""Helpers shared by the DeepLabV3+ parity tests and ``tools/bench_deeplab.py``: a randomised
PyTorch reference, the same weights in our model, layout conversion, shared dropout masks."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.models.deeplab import DeepLabConfig, DeepLabV3Plus
from zsp_jax.models.deeplab.convert import convert
from zsp_jax.utils.weights import build_with_weights


def torch_reference(config: DeepLabConfig, seed: int = 0) -> Any:
    """UniMatch's DeepLabV3+ in PyTorch (``zsp_jax.references.unimatch_model``) for ``config``,
    every tensor randomised (``randomize_``), in eval mode."""
    from zsp_jax.references import unimatch_model
    from zsp_jax.references.torch_utils import randomize_

    return randomize_(unimatch_model.build(config), seed).eval()


def ours_from_torch(config: DeepLabConfig, torch_model: Any, *, dtype: Any = None,
                    param_dtype: Any = jnp.float32, seed: int = 0) -> DeepLabV3Plus:
    """Our model with the reference's weights, converted through the UniMatch-key converter."""
    weights, _ = convert(torch_model.state_dict(), config, source_name="reference state_dict")
    return build_with_weights(lambda: DeepLabV3Plus(config, dtype=dtype, param_dtype=param_dtype,
                                                    rngs=nnx.Rngs(seed)),
                              weights, source_name="reference state_dict", dtype=param_dtype)


def random_model(config: DeepLabConfig, seed: int = 0, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 dropout_seed: int = 1) -> DeepLabV3Plus:
    """Our model with random numpy weights: He-scaled kernels, BN affine and statistics away from 1/0.

    Faster than ``DeepLabV3Plus(config, rngs=...)`` on CPU, where XLA compiles the
    (partitionable) threefry generator once per parameter shape, about a second each.
    """
    from zsp_jax.models.deeplab.convert import model_shapes

    rng = np.random.default_rng(seed)
    weights = {}
    for key, s in model_shapes(config).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            weights[key] = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape)
        elif leaf == "scale":
            weights[key] = 1.0 + 0.1 * rng.normal(size=s.shape)
        elif leaf == "var":
            weights[key] = 0.5 + np.abs(rng.normal(size=s.shape))
        else:  # bias, mean
            weights[key] = 0.1 * rng.normal(size=s.shape)
        weights[key] = weights[key].astype(np.float32)
    return build_with_weights(lambda: DeepLabV3Plus(config, dtype=dtype, param_dtype=param_dtype,
                                                    rngs=nnx.Rngs(params=0, dropout=dropout_seed)),
                              weights, source_name="random weights", dtype=param_dtype)


def nchw_to_nhwc(t: Any) -> np.ndarray:
    """torch (B, C, H, W) -> numpy (B, H, W, C)."""
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def random_fp_masks(config: DeepLabConfig, batch: int, seed: int = 0, dtype: Any = np.float32
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Channel keep-masks (B, C_low), (B, C_high) of 0/1 with keep probability 0.5."""
    rng = np.random.default_rng(seed)
    return ((rng.random((batch, config.low_level_in)) < 0.5).astype(dtype),
            (rng.random((batch, config.high_level_in)) < 0.5).astype(dtype))


def batch_stats_by_torch_key(model: DeepLabV3Plus, config: DeepLabConfig, torch_keys: Any) -> dict[str, np.ndarray]:
    """Our BatchNorm running statistics keyed by the reference's names (``...running_mean/var``)."""
    import re

    from zsp_jax.models.deeplab.convert import head_rules, resnet_rules, xception_rules

    backbone = (xception_rules(config.xception_middle + 4, "backbone.") if config.backbone == "xception"
                else resnet_rules(config.resnet_stem, "backbone."))
    rules = [(re.compile(r.pattern), r) for r in backbone + head_rules()]
    ours = {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    out = {}
    for key in torch_keys:
        if not (key.endswith("running_mean") or key.endswith("running_var")):
            continue
        match, rule = next((m, r) for rx, r in rules if (m := rx.fullmatch(key)))
        out[key] = ours[rule.targets(match)[0]]
    return out

"""Shared by the DPT tests: randomised PyTorch references (UniMatch V2's head and model, re-stated in
``zsp_jax.references.unimatch_v2_model``), the same weights in our modules, random token maps."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from zsp_jax.models.dpt import DptConfig, DptHead, DptHeadConfig, DptSegmenter
from zsp_jax.models.dpt.convert import convert_head
from zsp_jax.references import unimatch_v2_model as ref_lib
from zsp_jax.references.torch_utils import randomize_
from zsp_jax.utils.weights import build_with_weights, flat_weights

HEAD_CONFIGS = {
    "tiny": DptHeadConfig.tiny(),
    "small": DptHeadConfig.for_encoder("small", num_classes=21),
    "base": DptHeadConfig.for_encoder("base", num_classes=19),
}


def torch_head(config: DptHeadConfig, seed: int = 0) -> Any:
    """V2's ``DPTHead`` for ``config`` with every tensor randomised (deterministic per seed)."""
    torch.manual_seed(seed)
    head = ref_lib.DPTHead(config.num_classes, config.embed_dim, config.features, config.use_bn,
                           out_channels=list(config.out_channels))
    return randomize_(head, seed).eval()


def head_from_torch(config: DptHeadConfig, ref: Any, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> DptHead:
    """Our ``DptHead`` with the reference head's weights, through the converter's head rules."""
    weights, found = convert_head(ref.state_dict(), config, src="", dst="", source_name="reference head")
    assert found == config
    return build_with_weights(lambda: DptHead(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                              weights, source_name="reference head", dtype=param_dtype)


def random_tokens(batch: int, grid: tuple[int, int], channels: int, seed: int = 0,
                  dtype: Any = np.float32) -> list[np.ndarray]:
    """4 token maps (B, h*w, C) ~ N(0, 1), as layer-normed encoder features roughly are."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, grid[0] * grid[1], channels)).astype(dtype) for _ in range(4)]


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def nhwc_to_nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def flat_grads(grads: Any) -> dict[str, np.ndarray]:
    """An NNX gradient state as ``{"a.b.kernel": array}``."""
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}


# ----------------------------------------------------------------------------- a stand-in encoder


class TorchStandInEncoder(torch.nn.Module):
    """A small deterministic encoder with DINOv2's interface (``embed_dim``,
    ``get_intermediate_layers(x, indices)`` -> (B, N, C) row-major patch tokens): a 14x14/14 patch
    conv, then ``depth`` blocks ``t <- t + tanh(linear(t))``. Lets the model tests run the real
    ``DPT.forward`` (patch grid, feature masks, final resize) without the DINOv2 family."""

    def __init__(self, embed_dim: int = 16, depth: int = 4, patch: int = 14, seed: int = 0):
        super().__init__()
        self.embed_dim = embed_dim
        self.proj = torch.nn.Conv2d(3, embed_dim, patch, patch)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(embed_dim, embed_dim) for _ in range(depth)])
        randomize_(self, seed)

    def get_intermediate_layers(self, x, n):
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        out = []
        for i, block in enumerate(self.blocks):
            tokens = tokens + torch.tanh(block(tokens))
            if i in n:
                out.append(tokens)
        return tuple(out)


class StandInEncoder(nnx.Module):
    """``TorchStandInEncoder`` in JAX with its weights (NHWC images)."""

    def __init__(self, ref: TorchStandInEncoder, param_dtype: Any = jnp.float32):
        self.patch = ref.proj.kernel_size[0]
        sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        self.proj_kernel = nnx.Param(jnp.asarray(sd["proj.weight"].transpose(2, 3, 1, 0), param_dtype))
        self.proj_bias = nnx.Param(jnp.asarray(sd["proj.bias"], param_dtype))
        self.kernels = nnx.List([nnx.Param(jnp.asarray(sd[f"blocks.{i}.weight"].T, param_dtype))
                                 for i in range(len(ref.blocks))])
        self.biases = nnx.List([nnx.Param(jnp.asarray(sd[f"blocks.{i}.bias"], param_dtype))
                                for i in range(len(ref.blocks))])

    def intermediate_layers(self, images, indices):
        import jax

        p = self.patch
        b, h, w, c = images.shape
        h, w = h // p * p, w // p * p  # a VALID conv, as the torch stand-in's
        patches = images[:, :h, :w].reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = jnp.einsum("bhwijc,ijcd->bhwd", patches, self.proj_kernel.get_value()) + self.proj_bias.get_value()
        tokens = tokens.reshape(b, -1, tokens.shape[-1])
        out = []
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            tokens = tokens + jax.numpy.tanh(tokens @ kernel.get_value() + bias.get_value())
            if i in indices:
                out.append(tokens)
        return out


@dataclasses.dataclass(frozen=True)
class StandInEncoderConfig:
    """The encoder fields ``DptConfig`` reads, for the stand-in."""

    embed_dim: int = 16
    patch_size: int = 14
    intermediate_indices: tuple[int, ...] = (0, 1, 2, 3)


def stand_in_pair(head: DptHeadConfig, *, seed: int = 0, lock_backbone: bool = False,
                  param_dtype: Any = jnp.float32, dtype: Any = None) -> tuple[Any, Any, DptConfig]:
    """(reference DPT on the torch stand-in, our DptSegmenter on the JAX stand-in, config), same weights."""
    torch.manual_seed(seed)  # the constructors' init decides the scale randomize_ keeps: same seed, same weights
    config = DptConfig(encoder=StandInEncoderConfig(embed_dim=head.embed_dim), head=head, lock_backbone=lock_backbone)
    encoder = TorchStandInEncoder(head.embed_dim, seed=seed)
    ref = ref_lib.DPT(encoder, encoder_size="stand_in", nclass=head.num_classes, features=head.features,
                      out_channels=list(head.out_channels), layer_indices=config.intermediate_indices)
    randomize_(ref.head, seed + 1)
    ref.eval()
    weights, _ = convert_head(ref.state_dict(), head, dst="head.", source_name="reference DPT")
    weights.update({"backbone." + k: v for k, v in flat_weights(StandInEncoder(encoder)).items()})
    ours = build_with_weights(lambda: DptSegmenter(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                                   backbone=StandInEncoder(encoder, param_dtype)),
                              weights, source_name="reference DPT", dtype=param_dtype)
    return ref, ours, config


def random_images(batch: int, height: int, width: int, seed: int = 0, dtype: Any = np.float32) -> np.ndarray:
    """(B, H, W, 3) ~ N(0, 1), as ImageNet-normalised images roughly are."""
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(dtype)


# ----------------------------------------------------------------------------- with the DINOv2 encoder


def dinov2_reference(config: DptConfig, seed: int = 0) -> Any:
    """V2's ``DPT`` on the DINOv2 reference (transformers' Dinov2Model with DINOv2's positional
    resampling, ``zsp_jax.references.dinov2``), every tensor randomised, eval mode."""
    from zsp_jax.references import dinov2 as dinov2_ref

    torch.manual_seed(seed)
    encoder = dinov2_ref.Dinov2Backbone(dinov2_ref.hf_model(config.encoder, seed=seed))
    head = config.head
    ref = ref_lib.DPT(encoder, encoder_size=config.variant, nclass=head.num_classes, features=head.features,
                      out_channels=list(head.out_channels), layer_indices=config.intermediate_indices)
    randomize_(ref.head, seed + 1)
    return ref.eval()


def v2_state_dict(ref: Any, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The reference's weights with V2's checkpoint keys: ``backbone.*`` in DINOv2's layout, ``head.*``."""
    from zsp_jax.references import dinov2 as dinov2_ref

    sd = {f"{prefix}backbone.{k}": v for k, v in dinov2_ref.official_state_dict(ref.backbone.model).items()}
    sd.update({f"{prefix}head.{k}": v.detach().clone() for k, v in ref.head.state_dict().items()})
    return sd


def dinov2_pair(config: DptConfig, seed: int = 0, *, dtype: Any = None, param_dtype: Any = jnp.float32):
    """(reference, our DptSegmenter with its weights through the V2 converter)."""
    from zsp_jax.models.dpt.convert import convert_segmenter_state_dict

    ref = dinov2_reference(config, seed)
    converted = convert_segmenter_state_dict(v2_state_dict(ref), config, source_name="reference DPT")
    return ref, converted.build(dtype=dtype, param_dtype=param_dtype)

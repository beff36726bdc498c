"""Reference segment-anything models for parity tests and benchmarks (any ``SamConfig``, no download).

``reference_sam(config)`` builds segment-anything's ``Sam`` from its modeling classes with the
config's numbers (the registry builders fix the image size at 1024), randomises every tensor
(random init leaves LayerNorms at 1/0 and the relative-position tables at 0) and returns it
in eval mode. ``flax_sam_from_reference`` converts it with the production rule table. Needs
torch and the torchvision stand-in (``zsp_jax.references.torchvision_stub.install()``), which
tests/conftest.py installs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax.numpy as jnp

from zsp_jax.models.sam.config import SamConfig
from zsp_jax.references.torch_utils import randomize_


def reference_sam(config: SamConfig, *, seed: int = 0, randomize: bool = True) -> Any:
    """A segment-anything ``Sam`` with the architecture of ``config``, every tensor random, eval mode."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = config
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.encoder_depth, embed_dim=c.encoder_dim, img_size=c.image_size, mlp_ratio=c.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c.encoder_heads,
            patch_size=c.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(c.global_attn_indexes), window_size=c.window_size,
            out_chans=c.prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_dim, image_embedding_size=(c.grid_size, c.grid_size),
            input_image_size=(c.image_size, c.image_size), mask_in_chans=c.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=c.decoder_depth, embedding_dim=c.prompt_dim,
                                          mlp_dim=c.decoder_mlp_dim, num_heads=c.decoder_heads,
                                          attention_downsample_rate=c.attention_downsample_rate),
            transformer_dim=c.prompt_dim, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim),
        pixel_mean=list(c.pixel_mean), pixel_std=list(c.pixel_std),
    )
    if randomize:
        randomize_sam_(sam, seed=seed)
    return sam.eval()


def randomize_sam_(sam: Any, seed: int = 0) -> Any:
    """``randomize_`` every tensor of a segment-anything ``Sam`` except its pixel normalisation constants."""
    import torch

    mean, std = sam.pixel_mean.clone(), sam.pixel_std.clone()
    randomize_(sam, seed=seed)
    with torch.no_grad():  # randomize_ also visits these non-persistent buffers
        sam.pixel_mean.copy_(mean)
        sam.pixel_std.copy_(std)
    return sam


def registry_sam(name: str, *, seed: int = 0) -> Any:
    """``sam_model_registry[name](checkpoint=None)`` (1024 px), every tensor randomised, eval mode."""
    from segment_anything import sam_model_registry

    return randomize_sam_(sam_model_registry[name](checkpoint=None), seed=seed).eval()


def flax_sam_from_reference(reference: Any, config: SamConfig, *, dtype: Any = jnp.float32,
                            param_dtype: Any = jnp.float32) -> Any:
    """The zsp_jax ``Sam`` holding the reference's weights (converted with the production rules)."""
    from zsp_jax.models.sam.convert import from_state_dict

    return from_state_dict(reference.state_dict(), config=config, dtype=dtype, param_dtype=param_dtype,
                           source_name="reference state_dict")


def reference_decode(reference: Any, embeddings: Any, point_coords: Any = None, point_labels: Any = None,
                     boxes: Any = None, mask_inputs: Any = None, *, multimask_output: bool) -> tuple[Any, Any]:
    """The reference prompt encoder + mask decoder on ONE image's prompts (as SamPredictor.predict_torch).

    Args (torch tensors, reference layouts): embeddings (1, C, g, g); point_coords (N, P, 2);
    point_labels (N, P); boxes (N, 4); mask_inputs (N, 1, 4g, 4g).

    Returns:
      (low_res_logits (N, K, 4g, 4g), iou_predictions (N, K)) as numpy float32.
    """
    import torch

    with torch.no_grad():
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = reference.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        low, iou = reference.mask_decoder(image_embeddings=embeddings,
                                          image_pe=reference.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=multimask_output)
    return low.numpy(), iou.numpy()


def random_prompts(rng: Any, b: int, n: int, p: int, size: int, *, with_padding: bool = True
                   ) -> tuple[Any, Any, Any, Any]:
    """Random prompts in the resized-input frame of a ``size`` x ``size`` input.

    Returns numpy (coords (b, n, p, 2) float32, labels (b, n, p) int32 in {-1, 0, 1} (no -1
    unless ``with_padding``), boxes (b, n, 4) XYXY float32, mask inputs (b, n, size/4, size/4, 1)).
    """
    import numpy as np

    coords = rng.uniform(0, size, size=(b, n, p, 2)).astype(np.float32)
    labels = rng.integers(-1 if with_padding else 0, 2, size=(b, n, p)).astype(np.int32)
    boxes = np.sort(rng.uniform(0, size, size=(b, n, 2, 2)), axis=2).reshape(b, n, 4).astype(np.float32)
    masks = (3 * rng.normal(size=(b, n, size // 4, size // 4, 1))).astype(np.float32)
    return coords, labels, boxes, masks


def mask_disagreement(ours: Any, reference_logits: Any, band: float = 1e-3) -> tuple[int, int]:
    """(pixels where ``ours`` != ``reference_logits > 0`` outside the band |logit| <= band, pixels in the band).

    Final binary masks must be identical except where the reference logit is within ``band``
    of the threshold, where float rounding may flip the decision.
    """
    import numpy as np

    ref = np.asarray(reference_logits)
    ours = np.asarray(ours).astype(bool)
    near = np.abs(ref) <= band
    return int(np.sum((ours != (ref > 0)) & ~near)), int(np.sum(near))

"""DINOv2 ViT encoders (S/14, B/14, L/14, g/14, with or without registers) in Flax NNX, as UniMatch V2 uses them.

Public API (NHWC throughout; images (B, H, W, 3) float32 normalised with ``normalize_images``,
H and W multiples of 14; gh = H / 14, gw = W / 14, N = gh * gw, C = ``config.embed_dim``):

* ``Dinov2Config``: frozen architecture + resampling rule. ``Dinov2Config.vit_s14() / vit_b14() /
  vit_l14() / vit_g14()`` (``registers=True`` for the ``_reg4`` checkpoints), V2's names
  ``.small() / .base() / .large() / .giant()``, ``.from_name("vit_b14_reg4" | "base" | "b")``,
  ``.tiny()`` for tests. Fields used by the DPT head: ``embed_dim``, ``patch_size``,
  ``intermediate_indices`` (V2's blocks: S/B 2, 5, 8, 11; L 4, 11, 17, 23; g 9, 19, 29, 39).
* ``Dinov2(config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs=None, attention="auto")`` (``rngs`` defaults
  to ``nnx.Rngs(0)``; ``dtype=None`` means float32):
  - ``intermediate_layers(images, indices=None, *, norm=True) -> list of (B, N, C)``: DINOv2's
    ``get_intermediate_layers(x, n=indices, reshape=False, return_class_token=False, norm=True)``,
    default indices ``config.intermediate_indices`` (what V2's ``dpt.py`` feeds its head);
  - ``forward_features(images)`` / ``__call__`` -> ``Dinov2Features(cls_token (B, C),
    register_tokens (B, R, C), patch_tokens (B, N, C), prenorm (B, 1 + R + N, C))``;
  - ``block_outputs(images, indices) -> list of (B, 1 + R + N, C)`` (raw), ``embed(images)``,
    ``positional_embedding(H, W) -> (1 + N, C)`` float32.
  All have static shapes and run under ``jax.jit`` with the batch sharded over a mesh.
* ``normalize_images(uint8 or [0, 255] float (..., 3)) -> float32``; ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
* Converters (``tools/convert_dinov2.py``): ``convert_checkpoint(source, variant=None, entry=None,
  allow_custom=False, num_heads=None, ...) -> ConvertedDinov2`` for official ``.pth`` files,
  transformers directories / state_dicts and UniMatch V2 checkpoints (``entry`` 'model_ema' /
  'model'); ``convert_state_dict``; ``save_dinov2``; ``load_dinov2(path, dtype=..., param_dtype=...)
  -> Dinov2`` (no torch); ``build_dinov2``; ``read_dinov2_config``; the rule tables
  ``official_rules(src, dst)`` / ``hf_rules(src, dst)`` (e.g. ``src="backbone.", dst="backbone."`` for
  a V2 segmenter) and ``infer_config``.
"""

from zsp_jax.models.dinov2.config import ALIASES, VARIANTS, Dinov2Config, swiglu_hidden_dim
from zsp_jax.models.dinov2.convert import (
    FORMATS,
    V2_ENTRIES,
    ConvertedDinov2,
    build_dinov2,
    convert_checkpoint,
    convert_state_dict,
    hf_rules,
    infer_config,
    load_dinov2,
    official_rules,
    read_checkpoint,
    read_dinov2_config,
    save_dinov2,
    unchunk_blocks,
)
from zsp_jax.models.dinov2.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dinov2,
    Dinov2Features,
    normalize_images,
    pos_embed_matrices,
)

__all__ = [
    "ALIASES",
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "V2_ENTRIES",
    "VARIANTS",
    "ConvertedDinov2",
    "Dinov2",
    "Dinov2Config",
    "Dinov2Features",
    "build_dinov2",
    "convert_checkpoint",
    "convert_state_dict",
    "hf_rules",
    "infer_config",
    "load_dinov2",
    "normalize_images",
    "official_rules",
    "pos_embed_matrices",
    "read_checkpoint",
    "read_dinov2_config",
    "save_dinov2",
    "swiglu_hidden_dim",
    "unchunk_blocks",
]

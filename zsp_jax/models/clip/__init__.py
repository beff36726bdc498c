"""CLIP ViT towers and GEM dense features in Flax NNX, with converters and an offline tokenizer.

Typical use (the labeller):

    from zsp_jax.models import clip
    model = clip.load_clip("clip_vit_b16.safetensors")           # converted once, see tools/convert_clip.py
    tok = clip.ClipTokenizer.load()                                # offline; ids as OpenAI/open_clip
    text = clip.ClassEmbedder(model, tok, cache_dir="cache")(classnames, "single")   # (C, D), unit rows
    dense = clip.dense_features_fn(model, clip.GemConfig(), normalize=True)
    feats = dense(clip.gem_preprocess_batch(images_uint8))        # tokens (B, 28, 28, D), image_embeds (B, D)
"""

from zsp_jax.models.clip.config import GEM_IMAGE_SIZE, VARIANTS, ClipConfig, GemConfig
from zsp_jax.models.clip.convert import (
    ConvertedClip,
    build_clip,
    convert_checkpoint,
    convert_state_dict,
    load_clip,
    read_clip_config,
    save_clip,
)
from zsp_jax.models.clip.model import (
    ClipModel,
    DenseFeatures,
    dense_features_fn,
    encode_image_fn,
    encode_text_fn,
    l2_normalize,
)
from zsp_jax.models.clip.preprocess import OPENAI_MEAN, OPENAI_STD, gem_preprocess, gem_preprocess_batch
from zsp_jax.models.clip.templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE, get_templates
from zsp_jax.models.clip.text_embeddings import ClassEmbedder, class_embeddings
from zsp_jax.models.clip.tokenizer import ClipTokenizer

__all__ = [
    "GEM_IMAGE_SIZE", "VARIANTS", "ClipConfig", "GemConfig", "ConvertedClip", "build_clip", "convert_checkpoint",
    "convert_state_dict", "load_clip", "read_clip_config", "save_clip", "ClipModel", "DenseFeatures",
    "dense_features_fn", "encode_image_fn", "encode_text_fn", "l2_normalize", "OPENAI_MEAN", "OPENAI_STD",
    "gem_preprocess", "gem_preprocess_batch", "IMAGENET_TEMPLATES", "SINGLE_TEMPLATE", "get_templates",
    "ClassEmbedder", "class_embeddings", "ClipTokenizer",
]

"""Our side of ``python -m zsp_jax.parity``: zsp_jax's models, mask generator and labeller.

The one place where the parity command touches the labeller and the mask generator (their public
entry points only): ``zsp_jax.label.labeller.Labeller``, ``zsp_jax.amg.generator.AutomaticMaskGenerator``,
``zsp_jax.label.options.LabelOptions`` (with its ``amg`` options), ``zsp_jax.label.classes.load_classes``,
``zsp_jax.label.model_files`` (``load_sam_checkpoint``, ``load_clip_checkpoint``, ``describe_sam``,
``describe_clip``) and the labeller's default config (``zsp_jax.label.default_config``). Models are
loaded as the labeller loads them (a converted ``.safetensors``, or the original file converted once
into ``<out>/checkpoints``), in the compute dtype asked for; every device call runs on one device
(the comparison is per image, and results do not depend on the number of devices).

``MODEL_HOOKS`` is for tests: each hook is called as ``hook(kind, model)`` (kind ``"sam"``, ``"clip"``,
``"deeplab"``) after one of our models is loaded, e.g. to swap two tensors and check that the command
notices a wrong conversion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODEL_HOOKS: list[Callable[[str, Any], None]] = []

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _hooked(kind: str, model: Any) -> Any:
    for hook in MODEL_HOOKS:
        hook(kind, model)
    return model


def one_device_mesh() -> Any:
    """A "data" mesh over the first local device."""
    from zsp_jax.utils.sharding import data_mesh

    return data_mesh(jax.devices()[:1])


# ----------------------------------------------------------------------------- settings


def default_label_section() -> Any:
    """The labeller's default ``label`` config section (``python -m zsp_jax.label`` without ``--config``)."""
    from zsp_jax.label import default_config

    return default_config.get_config().label


def class_list(classes: str) -> Any:
    """The labeller's ``ClassList`` of a class spec (voc | coco | a,b,c | FILE); ValueError naming the problem."""
    from zsp_jax.label.classes import load_classes

    return load_classes(classes)


def label_options(label_section: Any, classes: str) -> Any:
    """``LabelOptions`` of a ``label`` config section and a class spec (voc | coco | a,b,c | FILE)."""
    from zsp_jax.label.options import LabelOptions

    return LabelOptions.from_config(label_section, class_list(classes))


def with_amg(options: Any, amg: Any) -> Any:
    """``options`` with other AMG options (``options.amg.replace(...)``)."""
    return dataclasses.replace(options, amg=amg)


def for_run(options: Any, dtype: str, precision: str) -> Any:
    """``options`` for one run: its dtype and matmul precision, segment masks returned (for pairing)."""
    return dataclasses.replace(options, dtype=dtype, matmul_precision=precision, write_segments=True,
                               write_confidence=False)


def candidate_count(amg: Any) -> int:
    """Masks the generator decodes before any filter: 3 per point of every crop of every layer."""
    return sum(3 * len(grid) * 4 ** layer for layer, grid in enumerate(amg.layer_grids()))


# ----------------------------------------------------------------------------- models


def describe_sam(path: str) -> str:
    """The SAM variant a checkpoint holds (``vit_h``, ..., ``custom``), from metadata or shapes only, as the
    labeller's input check reads it; ValueError (``CheckpointError``) saying what is wrong and what to do."""
    from zsp_jax.label.model_files import describe_sam as describe

    return describe(path)


def describe_clip(path: str, model_name: str = "") -> str:
    """The CLIP variant a checkpoint holds, as ``describe_sam``; an open_clip file needs ``model_name``."""
    from zsp_jax.label.model_files import describe_clip as describe

    return describe(path, model_name)


def load_sam(path: str, cache_dir: str, *, dtype: str, allow_custom: bool, attention: str = "auto") -> Any:
    """Our ``Sam`` for a SAM file, as the labeller loads it."""
    from zsp_jax.label.model_files import load_sam_checkpoint

    sam, _ = load_sam_checkpoint(path, cache_dir, dtype=DTYPES[dtype], allow_custom=allow_custom,
                                 attention=attention)
    return _hooked("sam", sam)


def load_clip(path: str, cache_dir: str, *, model_name: str, dtype: str, attention: str = "auto") -> tuple[Any, Any]:
    """(our ``ClipModel``, its ``ClipTokenizer``) for a CLIP file, as the labeller loads them."""
    from zsp_jax.label.model_files import load_clip_checkpoint

    clip, tokenizer = load_clip_checkpoint(path, cache_dir, model_name=model_name, dtype=DTYPES[dtype],
                                           attention=attention)
    return _hooked("clip", clip), tokenizer


def load_deeplab(path: str, *, dtype: str, geometry: dict[str, Any]) -> Any:
    """Our ``DeepLabV3Plus`` for a UniMatch checkpoint (with ``geometry``: output stride, multi-grid, ASPP
    rates) or its converted ``.safetensors`` (with the config stored in it)."""
    from zsp_jax.models.deeplab.convert import config_for, detect_source, load_model, read_torch_checkpoint

    compute = None if dtype == "float32" else DTYPES[dtype]
    config = None
    if not path.endswith(".safetensors"):
        config = config_for(detect_source(read_torch_checkpoint(path), source_name=path), **geometry)
    model, _ = load_model(path, dtype=compute, config=config)
    return _hooked("deeplab", model)


# ----------------------------------------------------------------------------- SAM


class SamRunner:
    """Our SAM's image embedding and point-prompt decoding, as ``SamPredictor`` does them.

    Args:
      sam: our ``Sam``.
    """

    def __init__(self, sam: Any):
        self.sam = sam
        self._embed = nnx.jit(lambda model, x: model.embed(x))
        self._decode = nnx.jit(lambda model, emb, coords, labels: model.decode(emb, coords, labels,
                                                                                 multimask_output=True))

    def embedding(self, image: np.ndarray) -> jax.Array:
        """(1, g, g, C) embedding of one uint8 (H, W, 3) image (PIL resize, normalisation, padding)."""
        from zsp_jax.models.sam.transforms import preprocess

        c = self.sam.config
        x, _ = preprocess(image, c.image_size, c.pixel_mean, c.pixel_std)
        return self._embed(self.sam, jnp.asarray(x)[None])

    def point_prompts(self, embedding: jax.Array, points: np.ndarray, image_hw: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """One positive point per prompt: (N, 2) (x, y) original pixels -> (logits (N, 3, s, s), IoU (N, 3))."""
        from zsp_jax.models.sam.transforms import apply_coords

        coords = apply_coords(points[:, None, :], image_hw, self.sam.config.image_size)
        labels = np.ones(coords.shape[:2], np.int32)
        low, iou = self._decode(self.sam, embedding, jnp.asarray(coords)[None], jnp.asarray(labels)[None])
        return np.asarray(low[0], np.float32), np.asarray(iou[0], np.float32)


def mask_records(sam: Any, amg: Any, images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
    """``AutomaticMaskGenerator(sam, amg)`` records of each image (binary masks), on one device."""
    from zsp_jax.amg.generator import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(sam, amg.replace(output_mode="binary_mask"), mesh=one_device_mesh())
    return generator.generate_batch(list(images))


# ----------------------------------------------------------------------------- CLIP


def gem_tokens(clip: Any, gem: Any, x: np.ndarray) -> np.ndarray:
    """GEM patch tokens (gh, gw, D) float32 of one (c, c, 3) normalised GEM input."""
    from zsp_jax.models.clip import dense_features_fn

    out = dense_features_fn(clip, gem)(jnp.asarray(x)[None])
    return np.asarray(out.tokens[0], np.float32)


def text_embeddings(clip: Any, tokenizer: Any, prompts: Sequence[str], templates: str, run_tag: str) -> np.ndarray:
    """(P, D) unit prompt embeddings (templates averaged) as the labeller makes them.

    ``run_tag`` keeps one run's embeddings out of another's cache (same weights, other precision).
    """
    from zsp_jax.models.clip import ClassEmbedder
    from zsp_jax.models.clip.text_embeddings import text_tower_fingerprint

    embedder = ClassEmbedder(clip, tokenizer, checkpoint_id=f"{text_tower_fingerprint(clip)}-{run_tag}")
    return np.asarray(embedder(list(prompts), templates), np.float32)


def template_strings(templates: str) -> tuple[str, ...]:
    """The prompt templates of a template-set name (``single`` / ``imagenet80``)."""
    from zsp_jax.models.clip import get_templates

    return get_templates(templates)


# ----------------------------------------------------------------------------- the labeller


def label_images(sam: Any, clip: Any, tokenizer: Any, options: Any, images: Sequence[np.ndarray]) -> list[Any]:
    """The whole labeller on ``images`` (one device): one ``ImageResult`` per image (``label`` map and
    ``segments`` with COCO-RLE masks, ``class`` and ``score``)."""
    from zsp_jax.label.labeller import Labeller

    labeller = Labeller(sam, clip, tokenizer, options, mesh=one_device_mesh())
    return labeller.label(list(images))


def segment_masks(result: Any, image_hw: tuple[int, int]) -> np.ndarray:
    """(K, H, W) bool masks of one ``ImageResult``'s segments."""
    from pycocotools import mask as mask_utils

    masks = []
    for seg in result.segments:
        rle = dict(seg["segmentation"])
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
        masks.append(mask_utils.decode(rle).astype(bool))
    return np.stack(masks) if masks else np.zeros((0,) + tuple(image_hw), bool)


# ----------------------------------------------------------------------------- DeepLab


def deeplab_runner(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function: one (H, W, 3) ImageNet-normalised image -> (H, W, num_classes) float32 logits (eval
    mode; compiled once per image size)."""
    fn = nnx.jit(lambda m, a: m(a, train=False))
    return lambda x: np.asarray(fn(model, jnp.asarray(x)[None])[0], np.float32)

"""The PyTorch side of ``python -m zsp_jax.parity``: the user's original files in the original packages.

* SAM: segment-anything's ``sam_model_registry[vit_b|vit_l|vit_h]`` with the ``.pth`` loaded
  strictly (a custom architecture, e.g. the tiny test model, is built from segment-anything's
  modeling classes with the numbers its tensors give, ``zsp_jax.references.sam.reference_sam``).
* CLIP, in open_clip (gem-torch's GEM needs an open_clip model):
  - an OpenAI ``.pt`` (TorchScript or plain): ``open_clip.load_openai_model`` in fp32 (QuickGELU);
  - an open_clip state_dict: an open_clip ``CLIP`` / ``CustomTextCLIP`` of the file's shapes, with
    the activation and vision head width that open_clip's own registry gives the model name
    (``open_clip.get_model_config`` and the pretrained tag's ``quick_gelu``), loaded strictly;
  - a transformers directory: ``transformers.CLIPModel`` copied into an open_clip ``CLIP`` of the
    same shapes (q/k/v joined into ``in_proj``), and that copy checked against the transformers
    model itself (the ``clip.reference_layout`` row), so that the GEM reference rests on transformers.
* DeepLabV3+: UniMatch's model as restated in ``zsp_jax.references.unimatch_model`` for the
  architecture the tensors give, loaded strictly.

Everything runs on the CPU in float32 (torch's CPU build is what the project pins; on a CUDA torch
the reference would need TF32 switched off, and the CPU keeps it out of the question). Everything
here imports torch; ``zsp_jax.parity.inputs`` checks that torch is there before any work.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from zsp_jax.references import torchvision_stub

# ----------------------------------------------------------------------------- SAM


def load_sam(path: str) -> tuple[Any, Any]:
    """(segment-anything ``Sam`` in eval mode holding the ``.pth``, its ``SamConfig`` read from the shapes)."""
    torchvision_stub.install()
    from zsp_jax.models.sam.convert import infer_config
    from zsp_jax.utils import weights

    state = weights.unwrap_state_dict(weights.load_torch_checkpoint(path), path=path)
    config = infer_config(state, source_name=path)
    if config.name in ("vit_b", "vit_l", "vit_h"):
        from segment_anything import sam_model_registry

        sam = sam_model_registry[config.name](checkpoint=None)
    else:
        from zsp_jax.references.sam import reference_sam

        sam = reference_sam(config, randomize=False)
    sam.load_state_dict(dict(state), strict=True)
    return sam.eval(), config


def sam_embedding(sam: Any, image: np.ndarray) -> tuple[Any, np.ndarray]:
    """SamPredictor.set_image's embedding of one uint8 (H, W, 3) image.

    Returns:
      (torch (1, C, g, g) embedding for ``sam_point_prompts``, the same as numpy (g, g, C) float32).
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(x))
    return emb, emb[0].permute(1, 2, 0).numpy()


def sam_point_prompts(sam: Any, embedding: Any, points: np.ndarray, image_hw: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One positive point per prompt through the prompt encoder and mask decoder (multimask, as
    SamPredictor.predict_torch).

    Args:
      embedding: torch (1, C, g, g) from ``sam_embedding``.
      points: (N, 2) float64 (x, y) in the original image's pixels.

    Returns:
      (low-res logits (N, 3, 4g, 4g), IoU predictions (N, 3)) numpy float32.
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from zsp_jax.references.sam import reference_decode

    coords = ResizeLongestSide(sam.image_encoder.img_size).apply_coords(points[:, None, :], image_hw)
    coords = torch.as_tensor(coords, dtype=torch.float32)
    labels = torch.ones(coords.shape[:2], dtype=torch.int64)
    return reference_decode(sam, embedding, coords, labels, multimask_output=True)


def amg_records(sam: Any, amg_kwargs: dict[str, Any], images: Sequence[np.ndarray],
                tick: Callable[[int], None] = lambda n: None) -> list[list[dict[str, Any]]]:
    """``SamAutomaticMaskGenerator(sam, **amg_kwargs).generate`` of each image (``tick(1)`` after each)."""
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam, **amg_kwargs)
    out = []
    with torch.no_grad():
        for image in images:
            out.append(generator.generate(image))
            tick(1)
    return out


# ----------------------------------------------------------------------------- CLIP


@dataclasses.dataclass
class ReferenceClip:
    """An open_clip model holding the user's CLIP weights.

    Attributes:
      model: open_clip ``CLIP`` (eval, float32).
      source: how it was built, in words (for the report).
      layout_check: for a transformers directory, (open_clip copy's outputs, transformers' outputs)
        on the same input, to be compared; else None.
    """

    model: Any
    source: str
    layout_check: tuple[list[np.ndarray], list[np.ndarray]] | None = None


def open_clip_settings(model_name: str) -> tuple[bool, int]:
    """(quick_gelu, vision head width) open_clip's registry gives ``model_name`` (``ViT-B-16``,
    ``ViT-B-16-quickgelu``, ``ViT-B-16/openai``, or an open_clip model-config ``.json``).

    Raises ValueError for a name open_clip does not know.
    """
    import json

    torchvision_stub.install()
    import open_clip

    if model_name.endswith(".json") and os.path.isfile(model_name):
        with open(model_name, encoding="utf-8") as f:
            cfg = json.load(f)
        return bool(cfg.get("quick_gelu", False)), int(cfg.get("vision_cfg", {}).get("head_width", 64))
    arch, _, tag = model_name.replace(":", "/").partition("/")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{model_name!r} is not an open_clip model name (see open_clip.list_models(), e.g. "
                         "ViT-B-16-quickgelu for OpenAI's weights, ViT-B-16 for LAION / DataComp weights)")
    quick = bool(cfg.get("quick_gelu", False))
    if tag:
        quick = quick or bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    return quick, int(cfg.get("vision_cfg", {}).get("head_width", 64))


def _open_clip_of_shapes(state: dict[str, Any], *, quick_gelu: bool, head_width: int, text_head_width: int = 64
                         ) -> Any:
    """An open_clip CLIP (CustomTextCLIP for ``text.*`` keys) with the architecture of an OpenAI-layout
    state_dict, float32, ``state`` loaded strictly. Head counts: width / head width (text heads are 64
    wide in every OpenAI / open_clip ViT)."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    custom = any(k.startswith("text.") for k in state)
    text = "text." if custom else ""
    conv = state["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    text_width = int(state[f"{text}ln_final.weight"].shape[0])
    text_layers = len({k.split(".")[2 + bool(custom)] for k in state if k.startswith(f"{text}transformer.resblocks.")})
    if f"{text}text_projection" not in state:
        raise ValueError("an open_clip text tower with a Linear projection (proj_type) is not supported here")
    embed_dim = int(state[f"{text}text_projection"].shape[1])
    vision_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    text_mlp = state[f"{text}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=grid * patch, head_width=head_width,
                           mlp_ratio=vision_mlp)
    text_cfg = CLIPTextCfg(context_length=int(state[f"{text}positional_embedding"].shape[0]),
                           vocab_size=int(state[f"{text}token_embedding.weight"].shape[0]), width=text_width,
                           heads=max(text_width // text_head_width, 1), layers=text_layers, mlp_ratio=text_mlp)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    model = cls(embed_dim, vision, text_cfg, quick_gelu=quick_gelu).float()
    model.load_state_dict({k: torch.as_tensor(v).float() for k, v in state.items()}, strict=True)
    return model.eval()


def _hf_to_open_clip(hf: Any) -> dict[str, Any]:
    """A transformers CLIPModel's weights re-laid as an open_clip CLIP state_dict (q/k/v joined)."""
    import torch

    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    out = {"visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].T.contiguous(),
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "text_projection": sd["text_projection.weight"].T.contiguous(),
           "logit_scale": sd["logit_scale"]}
    for src, dst in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                     ("text_model.final_layer_norm", "ln_final")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    for src, dst in (("vision_model.encoder.layers", "visual.transformer.resblocks"),
                     ("text_model.encoder.layers", "transformer.resblocks")):
        n = len({k[len(src) + 1:].split(".")[0] for k in sd if k.startswith(src + ".")})
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            for part in ("weight", "bias"):
                out[f"{d}.attn.in_proj_{part}"] = torch.cat([sd[f"{s}.self_attn.{p}_proj.{part}"] for p in "qkv"])
                out[f"{d}.attn.out_proj.{part}"] = sd[f"{s}.self_attn.out_proj.{part}"]
                out[f"{d}.ln_1.{part}"] = sd[f"{s}.layer_norm1.{part}"]
                out[f"{d}.ln_2.{part}"] = sd[f"{s}.layer_norm2.{part}"]
                out[f"{d}.mlp.c_fc.{part}"] = sd[f"{s}.mlp.fc1.{part}"]
                out[f"{d}.mlp.c_proj.{part}"] = sd[f"{s}.mlp.fc2.{part}"]
    return out


def load_clip(path: str, model_name: str = "") -> ReferenceClip:
    """The user's CLIP file as an open_clip model (see the module docstring)."""
    torchvision_stub.install()
    import open_clip
    import torch

    from zsp_jax.models.clip.convert import is_torchscript_archive, read_torch_file

    if os.path.isdir(path):
        from transformers import CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf = CLIPModel.from_pretrained(path, attn_implementation="eager", torch_dtype=torch.float32).eval()
        vcfg = hf.config.vision_config
        quick = vcfg.hidden_act == "quick_gelu"
        tcfg = hf.config.text_config
        model = _open_clip_of_shapes(_hf_to_open_clip(hf), quick_gelu=quick,
                                     head_width=vcfg.hidden_size // vcfg.num_attention_heads,
                                     text_head_width=tcfg.hidden_size // tcfg.num_attention_heads)
        rng = np.random.default_rng(0)
        images = torch.from_numpy(rng.standard_normal((2, 3, vcfg.image_size, vcfg.image_size)).astype(np.float32))
        ids = open_clip.tokenize(["a photo of a cat.", "a diagram"])
        with torch.no_grad():
            ours = [model.encode_image(images).numpy(), model.encode_text(ids).numpy()]
            theirs = [hf.get_image_features(pixel_values=images).pooler_output.numpy(),
                      hf.get_text_features(input_ids=ids).pooler_output.numpy()]
        return ReferenceClip(model, f"transformers CLIPModel ({vcfg.hidden_act}) copied into open_clip",
                             (ours, theirs))
    # A causal-mask buffer is no weight (open_clip keeps it out of its state_dict; older files have it).
    state = {k: v for k, v in read_torch_file(path).items() if not k.endswith("attn_mask")}
    if is_torchscript_archive(path) or "input_resolution" in state:
        # As open_clip.load_openai_model builds OpenAI's models (QuickGELU, 64-wide heads), but with the
        # weights at their stored precision: it would round a float32 file to float16 first.
        state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        model = _open_clip_of_shapes(state, quick_gelu=True, head_width=64)
        return ReferenceClip(model, "OpenAI CLIP as open_clip builds it (QuickGELU)")
    if not model_name:
        raise ValueError(f"{path}: an open_clip state_dict does not record its activation: name its open_clip model "
                         "with --clip_model_name (ViT-B-16-quickgelu for OpenAI's weights, ViT-B-16 for LAION / "
                         "DataComp weights)")
    quick, head_width = open_clip_settings(model_name)
    model = _open_clip_of_shapes(state, quick_gelu=quick, head_width=head_width)
    act = "QuickGELU" if quick else "GELU"
    return ReferenceClip(model, f"open_clip CLIP of the file's shapes as {model_name} ({act}, vision heads "
                                f"{head_width} wide)")


def gem_wrapper(model: Any, gem: Any) -> Any:
    """gem-torch's wrapper of ``model`` with the labeller's GEM settings (``GemConfig``)."""
    from zsp_jax.references.clip import gem_reference

    return gem_reference(model, depth=gem.depth, ss_attn_iter=gem.ss_attn_iter, ss_attn_temp=gem.ss_attn_temp)


def gem_input(image: np.ndarray, clip_size: int) -> np.ndarray:
    """GEM's own image transform (bicubic resize to a square, OpenAI normalisation) of one uint8 image:
    (clip_size, clip_size, 3) float32, NHWC."""
    import gem
    from PIL import Image

    x = gem.get_gem_img_transform(img_size=(clip_size, clip_size))(Image.fromarray(image))
    return x.permute(1, 2, 0).numpy()


def gem_tokens(wrapper: Any, x: np.ndarray) -> np.ndarray:
    """GEM patch tokens (gh, gw, D) float32 of one (c, c, 3) GEM input."""
    from zsp_jax.references.clip import gem_reference_features

    feat_gem, _ = gem_reference_features(wrapper, x[None])
    tokens = feat_gem[0, 1:]
    g = round(tokens.shape[0] ** 0.5)
    return tokens.reshape(g, g, -1)


def reference_labeller(sam: Any, amg_kwargs: dict[str, Any], clip: Any, wrapper: Any, options: Any,
                       templates: tuple[str, ...]) -> Any:
    """``zsp_jax.references.label_reference.ReferenceLabeller`` with the labeller's options."""
    from zsp_jax.references.label_reference import ReferenceLabeller

    texts, _ = options.classes.prompt_rows()
    return ReferenceLabeller(sam, amg_kwargs, clip, wrapper, texts, options.rules(), clip_size=options.clip_size,
                             templates=templates)


# ----------------------------------------------------------------------------- DeepLab


def load_deeplab(path: str, geometry: dict[str, Any]) -> tuple[Any, Any]:
    """(UniMatch's DeepLabV3+ (eval) holding a UniMatch training checkpoint, its ``DeepLabConfig``): the
    architecture its tensors give, with ``geometry``'s output stride, multi-grid and ASPP rates.

    Raises ValueError for a backbone-only file (no head to compare) or tensors the model lacks.
    """
    from zsp_jax.models.deeplab.convert import config_for, detect_source, read_torch_checkpoint
    from zsp_jax.references import unimatch_model

    state = read_torch_checkpoint(path)
    info = detect_source(state, source_name=path)
    if info.contents != "full":
        raise ValueError(f"--deeplab={path} is {info.describe()}: the parity check needs a trained DeepLabV3+ "
                         "checkpoint (UniMatch's best.pth), not a backbone")
    config = config_for(info, **geometry)
    model = unimatch_model.build(config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    # UniMatch's Xception keeps bookkeeping tensors (itr / tmp) that are no weights; anything else is a mismatch.
    unexpected = [k for k in unexpected if "itr" not in k and "tmp" not in k]
    if missing or unexpected:
        raise ValueError(f"--deeplab={path}: the reference model does not fit the file (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    return model.eval(), config


def deeplab_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """(H, W, num_classes) float32 logits of one (H, W, 3) ImageNet-normalised image."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])
    return out[0].permute(1, 2, 0).numpy()

"""Fixtures of the parity command's tests: the PyTorch-format tiny random checkpoints of the smoke default
(a segment-anything .pth and an open_clip state_dict, ``zsp_jax.references.checkpoints``), their conversions,
a tiny UniMatch DeepLabV3+ checkpoint, two small photos and the label settings file."""

from __future__ import annotations

import os

import numpy as np
import pytest

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_parity_config.py")
CLIP_NAME = "ViT-B-16-quickgelu"  # the tiny open_clip model uses QuickGELU, as OpenAI's weights


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, str]:
    """Paths: sam_pth, clip_bin (originals), sam_st, clip_st (their conversions), deeplab_pth (a UniMatch
    checkpoint), hf_clip (a transformers directory), openai_pt (an OpenAI-style TorchScript .pt), images (a
    folder of two PNGs), config."""
    import torch
    from PIL import Image

    from zsp_jax.models.clip import convert as clip_convert
    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.models.sam.convert import convert_checkpoint
    from zsp_jax.references.amg import sample_images
    from zsp_jax.references.checkpoints import pytorch_checkpoints
    from zsp_jax.references.clip import hf_clip_config, hf_clip_model, tiny_open_clip
    from zsp_jax.references.deeplab import torch_reference

    root = tmp_path_factory.mktemp("parity_files")
    sam_pth, clip_bin = pytorch_checkpoints(str(root / "weights"))
    sam_st = str(root / "weights" / "sam_tiny.safetensors")
    convert_checkpoint(sam_pth, sam_st, allow_custom=True)
    clip_st = str(root / "weights" / "clip_tiny.safetensors")
    clip_convert.save_clip(clip_st, clip_convert.convert_checkpoint(clip_bin, model_name=CLIP_NAME))
    deeplab_pth = str(root / "weights" / "best.pth")
    # A UniMatch training checkpoint: {'model': state_dict of a DDP-wrapped model, ...}.
    model = torch_reference(DeepLabConfig.tiny_resnet(), seed=1)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, deeplab_pth)
    hf_dir = str(root / "weights" / "hf_clip")  # a transformers CLIPModel directory (save_pretrained)
    hf_clip_model(hf_clip_config(), seed=2).save_pretrained(hf_dir)
    openai_pt = str(root / "weights" / "ViT-tiny.pt")  # a TorchScript archive with fp16 weights, as OpenAI's
    jit_model = tiny_open_clip(quick_gelu=True, seed=4)
    torch.jit.save(torch.jit.script(jit_model.half()), openai_pt)
    images = root / "images"
    images.mkdir()
    for i, photo in enumerate(sample_images([(80, 96), (96, 72)])):
        Image.fromarray(photo).save(images / f"photo{i}.png")
    return {"sam_pth": sam_pth, "clip_bin": clip_bin, "sam_st": sam_st, "clip_st": clip_st,
            "deeplab_pth": deeplab_pth, "hf_clip": hf_dir, "openai_pt": openai_pt, "images": str(images),
            "config": CONFIG, "root": str(root)}


@pytest.fixture
def base_args(files, tmp_path) -> list[str]:
    """Flags every test shares: the originals on both sides, the images, the label settings, a fresh --out."""
    return ["--sam", files["sam_pth"], "--clip", files["clip_bin"], "--clip_model_name", CLIP_NAME,
            "--images", files["images"], "--config", files["config"], "--out", str(tmp_path / "out"), "--quiet"]


def read_report(out_dir: str) -> dict:
    import json

    with open(os.path.join(out_dir, "parity.json")) as f:
        return json.load(f)


def finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))

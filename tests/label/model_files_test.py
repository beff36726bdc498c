"""Checkpoints: converted files load, PyTorch files are converted once, every problem is one clear message."""

import os

import pytest

from zsp_jax.label import model_files
from zsp_jax.models.random_checkpoints import tiny_checkpoints
from zsp_jax.references.checkpoints import pytorch_checkpoints


def test_pytorch_files_are_converted_once(tmp_path):
    sam_pth, clip_bin = pytorch_checkpoints(str(tmp_path / "torch"))
    cache = str(tmp_path / "cache")
    with pytest.raises(model_files.CheckpointError, match="no SAM variant"):  # a tiny model is no standard variant
        model_files.sam_safetensors(sam_pth, cache)
    sam_st = model_files.sam_safetensors(sam_pth, cache, allow_custom=True)
    clip_st = model_files.clip_safetensors(clip_bin, cache, model_name="ViT-B-16-quickgelu")
    assert sam_st.startswith(cache) and clip_st.startswith(cache)
    stamps = os.stat(sam_st).st_mtime_ns, os.stat(clip_st).st_mtime_ns
    assert model_files.sam_safetensors(sam_pth, cache, allow_custom=True) == sam_st
    assert model_files.clip_safetensors(clip_bin, cache) == clip_st
    assert stamps == (os.stat(sam_st).st_mtime_ns, os.stat(clip_st).st_mtime_ns)  # reused, not reconverted
    sam, config = model_files.load_sam_checkpoint(sam_pth, cache, dtype="float32", allow_custom=True)
    assert config.name == "custom" and config.encoder_dim == 64 and config.encoder_heads == 2
    clip, tok = model_files.load_clip_checkpoint(clip_bin, cache, dtype="float32")
    assert clip.config.act == "quick_gelu" and tok("a cat").shape == (1, 77)
    os.utime(sam_pth, ns=(1, 1))  # the source changed: converted again
    model_files.sam_safetensors(sam_pth, cache, allow_custom=True)
    assert os.stat(sam_st).st_mtime_ns != stamps[0]


def test_problems_say_what_to_download(tmp_path):
    sam_st, clip_st = tiny_checkpoints(str(tmp_path / "ckpt"))
    cache = str(tmp_path / "cache")
    with pytest.raises(model_files.CheckpointError, match="no SAM checkpoint given.*sam_vit_h_4b8939.pth"):
        model_files.load_sam_checkpoint("", cache, dtype="float32")
    with pytest.raises(model_files.CheckpointError, match="not found.*convert_sam.py"):
        model_files.load_sam_checkpoint(str(tmp_path / "missing.pth"), cache, dtype="float32")
    with pytest.raises(model_files.CheckpointError, match="not a converted SAM checkpoint"):
        model_files.load_sam_checkpoint(clip_st, cache, dtype="float32")  # a CLIP file given as SAM
    with pytest.raises(model_files.CheckpointError, match="not a converted CLIP checkpoint.*ViT-B-16.pt"):
        model_files.load_clip_checkpoint(sam_st, cache, dtype="float32")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(model_files.CheckpointError, match="not a usable segment-anything checkpoint"):
        model_files.load_sam_checkpoint(str(junk), cache, dtype="float32")
    with pytest.raises(model_files.CheckpointError, match="not a usable CLIP checkpoint"):
        model_files.load_clip_checkpoint(str(junk), cache, dtype="float32")

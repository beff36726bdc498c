"""Weight files converted once: reused while the source is unchanged, converted again when it is replaced."""

import json
import os
import pathlib

import numpy as np
import pytest

from zsp_jax.utils.converted_files import RECORD_SUFFIX, convert_once, converted_path


def _writer(calls, payload):
    def convert(out):
        calls.append(out)
        with open(out, "w") as f:
            f.write(payload())
    return convert


def test_reused_while_unchanged_and_converted_again_when_the_source_changes(tmp_path):
    source = tmp_path / "model.pth"
    source.write_text("weights v1")
    out = converted_path(str(source), str(tmp_path / "cache"))
    assert out == str(tmp_path / "cache" / "model.safetensors")
    os.makedirs(os.path.dirname(out))
    calls, lines = [], []
    convert = _writer(calls, source.read_text)
    assert convert_once(str(source), out, convert, log=lines.append) == out
    assert convert_once(str(source), out, convert, log=lines.append) == out
    assert len(calls) == 1 and len(lines) == 1 and str(source) in lines[0]
    record = json.loads(pathlib.Path(out + RECORD_SUFFIX).read_text())
    assert record["source"] == str(source) and record["size"] == len("weights v1")

    source.write_text("weights v2, another file under the same name")
    convert_once(str(source), out, convert, log=lines.append)
    assert len(calls) == 2 and pathlib.Path(out).read_text() == "weights v2, another file under the same name"

    # a converted file whose record is missing (an older run, or a kill between file and record) is complete:
    # reused, so a resume on a machine without torch works; an unreadable record means convert again
    os.remove(out + RECORD_SUFFIX)
    convert_once(str(source), out, convert, log=lines.append)
    assert len(calls) == 2
    with open(out + RECORD_SUFFIX, "w") as f:
        f.write("{not json")
    convert_once(str(source), out, convert, log=lines.append)
    assert len(calls) == 3 and json.loads(pathlib.Path(out + RECORD_SUFFIX).read_text())["source"] == str(source)


def test_a_failed_conversion_records_nothing(tmp_path):
    source = tmp_path / "bad.pth"
    source.write_text("junk")
    out = str(tmp_path / "bad.safetensors")

    def convert(path):
        raise ValueError("not a checkpoint")

    with pytest.raises(ValueError, match="not a checkpoint"):
        convert_once(str(source), out, convert, log=lambda line: None)
    assert not os.path.exists(out) and not os.path.exists(out + RECORD_SUFFIX)


def test_a_transformers_directory_keeps_its_whole_name(tmp_path):
    directory = tmp_path / "clip-vit-base-patch16.v2"
    directory.mkdir()
    assert converted_path(str(directory), "c") == os.path.join("c", "clip-vit-base-patch16.v2.safetensors")
    assert converted_path(str(tmp_path / "ViT-B-16.pt"), "c") == os.path.join("c", "ViT-B-16.safetensors")


def test_the_trainer_converts_a_replaced_backbone_again(tmp_path):
    """The deeplab trainer's ``model.pretrained``: a different .pth under the same name is not trained from the old
    conversion."""
    import torch

    from zsp_jax.models.deeplab.config import DeepLabConfig
    from zsp_jax.references.torch_utils import randomize_
    from zsp_jax.references.unimatch_model import build
    from zsp_jax.train import state
    from zsp_jax.utils.weights import load_weights

    config = DeepLabConfig.tiny_resnet(num_classes=21)
    source = str(tmp_path / "backbone.pth")
    first = {}
    for seed in (0, 1):
        torch.save(randomize_(build(config), seed=seed).backbone.state_dict(), source)
        converted = state.pretrained_safetensors(source, str(tmp_path / "run"), config)
        assert converted == str(tmp_path / "run" / "converted" / "backbone.safetensors")
        weights, _ = load_weights(converted)
        if seed == 0:
            first, written = weights, os.stat(converted).st_mtime_ns
            assert state.pretrained_safetensors(source, str(tmp_path / "run"), config) == converted
            assert os.stat(converted).st_mtime_ns == written  # reused, not converted again
    assert first.keys() == weights.keys()
    assert any(not np.array_equal(first[name], weights[name]) for name in first)

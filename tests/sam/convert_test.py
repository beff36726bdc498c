"""Checkpoint conversion: round trips, variant inference, and the errors a bad file must give."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zsp_jax.models.sam import SamConfig, convert_checkpoint, convert_sam_state_dict, infer_config, load_sam
from zsp_jax.models.sam import convert as sam_convert
from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error
from zsp_jax.utils.weights import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "convert_sam.py")


def registry_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Shapes of ``sam_model_registry[name]()`` without allocating (meta tensors)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        return sam_model_registry[name]().state_dict()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_config, tiny_pair):
    """The tiny reference saved with torch.save, as users save segment-anything models."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(tiny_pair[0].state_dict(), path)
    return path


def test_round_trip_through_a_checkpoint_file(tmp_path, tiny_config, tiny_pair, tiny_checkpoint):
    """torch.save -> convert_checkpoint -> load_sam gives the reference's outputs."""
    ref, _ = tiny_pair
    out = tmp_path / "sam_tiny.safetensors"
    config = convert_checkpoint(tiny_checkpoint, out, allow_custom=True)
    assert config == SamConfig.tiny(image_size=256, name="custom")
    model, loaded = load_sam(out)
    assert loaded == config
    s = tiny_config.image_size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, s, s, 3)).astype(np.float32)
    coords, labels, boxes, _ = sam_refs.random_prompts(rng, 1, 3, 2, s)
    with torch.no_grad():
        emb = ref.image_encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
    want_low, want_iou = sam_refs.reference_decode(ref, emb, torch.from_numpy(coords[0]),
                                                      torch.from_numpy(labels[0]), torch.from_numpy(boxes[0]),
                                                      multimask_output=True)
    ours_emb = jax.jit(lambda m, x: m.embed(x))(model, jnp.asarray(x))
    low, iou = jax.jit(lambda m, *a: m.decode(*a, multimask_output=True))(
        model, ours_emb, jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(boxes))
    assert relative_error(ours_emb, emb.numpy().transpose(0, 2, 3, 1)) <= 1e-4
    assert relative_error(low[0], want_low) <= 1e-4 and relative_error(iou[0], want_iou) <= 1e-4


def test_every_tensor_has_exactly_one_rule_and_target():
    """For the three registry variants: all tensors consumed, all weights produced, shapes equal (no data)."""
    rules = sam_convert.sam_rules()
    for name in ("vit_b", "vit_l", "vit_h"):
        sd = registry_state_dict(name)
        expected = sam_convert.expected_shapes(SamConfig.from_name(name))
        produced = {}
        for key, t in sd.items():
            hits = [r for r in rules if re.fullmatch(r.pattern, key)]
            assert len(hits) == 1, (key, [r.pattern for r in hits])
            target = re.fullmatch(hits[0].pattern, key).expand(hits[0].target)
            shape = hits[0].transform(np.broadcast_to(np.float32(0), tuple(t.shape))).shape
            produced[target] = shape
        assert set(produced) == set(expected)
        assert all(tuple(expected[k].shape) == produced[k] for k in produced)


def test_variant_is_inferred_from_the_tensors():
    for name in ("vit_b", "vit_l", "vit_h"):
        assert infer_config(registry_state_dict(name)).name == name


def test_wrong_variant_names_fields_and_shapes():
    sd = registry_state_dict("vit_l")
    with pytest.raises(ConversionError) as e:
        convert_sam_state_dict(sd, variant="vit_b", source_name="sam_vit_l.pth")
    msg = str(e.value)
    assert "holds a vit_l model, not vit_b" in msg
    assert "encoder_dim: file 1024, vit_b 768" in msg and "encoder_depth: file 24, vit_b 12" in msg
    assert "shape mismatches" in msg
    assert "image_encoder.blocks.0.attn.qkv.weight (3072, 1024)" in msg and "expected (768, 2304)" in msg


def test_non_sam_state_dict_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), path)
    with pytest.raises(ConversionError, match="not a segment-anything SAM state_dict"):
        convert_checkpoint(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_tensor_is_named(tiny_pair):
    sd = dict(tiny_pair[0].state_dict())
    del sd["mask_decoder.output_upscaling.0.weight"]
    with pytest.raises(ConversionError, match=r"does not provide[\s\S]*output_upscaling\.conv1\.kernel"):
        convert_sam_state_dict(sd, allow_custom=True)


def test_missing_blocks_are_not_read_as_a_shallower_model():
    """A file that lost its last encoder block must not convert silently as an 11-block 'custom' model."""
    sd = {k: v for k, v in registry_state_dict("vit_b").items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(ConversionError, match=r"no SAM variant[\s\S]*nearest is vit_b[\s\S]*encoder_depth: file 11"):
        convert_sam_state_dict(sd)
    sd = {k: v for k, v in registry_state_dict("vit_b").items() if not k.startswith("image_encoder.blocks.4.")}
    with pytest.raises(ConversionError, match=r"blocks \[4\] are missing"):
        convert_sam_state_dict(sd)


def test_extra_tensor_is_named(tiny_pair):
    sd = dict(tiny_pair[0].state_dict())
    sd["mask_decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"match no rule[\s\S]*mask_decoder\.extra_head\.weight"):
        convert_sam_state_dict(sd, allow_custom=True)


def test_truncated_file(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated|not a readable"):
        convert_checkpoint(path, tmp_path / "out.safetensors", allow_custom=True)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ConversionError, match="empty"):
        convert_checkpoint(path, tmp_path / "out.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out.safetensors")


def test_load_refuses_foreign_and_truncated_weight_files(tmp_path, tiny_checkpoint):
    from zsp_jax.utils.weights import save_weights

    foreign = tmp_path / "clip.safetensors"
    save_weights(foreign, {"a": np.zeros(3, np.float32)}, {"zsp_jax.model": "clip"})
    with pytest.raises(ConversionError, match="'clip', expected 'sam'"):
        load_sam(foreign)
    good = tmp_path / "good.safetensors"
    convert_checkpoint(tiny_checkpoint, good, allow_custom=True)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ConversionError):
        load_sam(cut)


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_sam_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_tool(tmp_path, tiny_checkpoint, capsys):
    tool = load_tool()
    out = tmp_path / "tiny.safetensors"
    assert tool.main([str(tiny_checkpoint), str(out), "--allow-custom", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "custom" in printed and "check: embedding (1, 16, 16, 256)" in printed
    assert tool.main([str(tiny_checkpoint), str(tmp_path / "x.safetensors"), "--variant", "vit_b"]) == 2
    assert "holds a custom model, not vit_b" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert tool.main([str(tmp_path / "missing.pth"), str(tmp_path / "y.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_command_line_tool_names_the_bad_path(tmp_path, tiny_checkpoint, capsys):
    """Wrong inputs exit with status 2 and a one-line error naming the culprit, never a traceback or a file."""
    tool = load_tool()
    out = tmp_path / "out.safetensors"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    cases = [
        ([str(text), str(out)], [str(text), "not a readable PyTorch checkpoint"]),
        ([str(other), str(out)], [str(other), "not a segment-anything SAM state_dict"]),
        ([str(tmp_path), str(out)], [str(tmp_path), "not a readable PyTorch checkpoint"]),
        ([str(tiny_checkpoint), str(tiny_checkpoint), "--allow-custom"], [str(tiny_checkpoint), "is the source"]),
        ([str(tiny_checkpoint), str(tmp_path), "--allow-custom"], [str(tmp_path), "is a directory"]),
    ]
    for argv, expected in cases:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert all(e in err for e in expected), (argv, err)
    assert not out.exists()
    assert tiny_checkpoint.stat().st_size > 0 and torch.load(tiny_checkpoint, weights_only=True)


def test_bf16_weights_load(tmp_path, tiny_checkpoint):
    out = tmp_path / "tiny.safetensors"
    convert_checkpoint(tiny_checkpoint, out, allow_custom=True)
    model, _ = load_sam(out, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = model.image_encoder.blocks[0].attn.qkv.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    emb = jax.jit(lambda m, x: m.embed(x))(model, jnp.zeros((1, 256, 256, 3)))
    assert emb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(emb.astype(jnp.float32))))


@pytest.mark.full_size
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_registry_checkpoints_convert_in_bounded_memory(tmp_path, name):
    """A state_dict saved from ``sam_model_registry[name]`` converts with the CLI, every tensor intact.

    (vit_b goes through the same path in sam_full_parity_test.py, with random weights and a
    numerical comparison.) The model is built on the meta device and materialised with distinct
    cheap values per tensor (random init of vit_h's 636M parameters would cost more than the
    test); every converted tensor is then compared bit for bit with its source. The converter's
    peak RSS must stay within about two copies of the weights (the memory-mapped checkpoint's
    page cache plus the converted arrays) and an allowance for the Python/JAX runtime.
    """
    from safetensors import safe_open
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        model = sam_model_registry[name]()
    sd = model.to_empty(device="cpu").state_dict()
    del model
    with torch.no_grad():
        for i, t in enumerate(sd.values()):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape) * 1e-3 + i)
    src = tmp_path / f"sam_{name}.pth"
    torch.save(sd, src)
    size = os.path.getsize(src)
    out = tmp_path / f"sam_{name}.safetensors"
    run = subprocess.run([sys.executable, TOOL, str(src), str(out), "--variant", name], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    peak = float(re.search(r"peak RSS ([0-9.]+) GiB", run.stdout).group(1)) * 2**30
    assert peak <= 2.2 * size + 1.5 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB for {size / 2**30:.2f} GiB of weights"
    rules = sam_convert.sam_rules()
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata()["zsp_jax.variant"] == name
        assert SamConfig.from_json(f.metadata()["zsp_jax.config"]) == SamConfig.from_name(name)
        assert len(f.keys()) == len(sd)
        for key, t in sd.items():
            rule = next(r for r in rules if re.fullmatch(r.pattern, key))
            target = re.fullmatch(rule.pattern, key).expand(rule.target)
            want = np.ascontiguousarray(rule.transform(t.numpy()))
            assert np.array_equal(f.get_tensor(target), want), key

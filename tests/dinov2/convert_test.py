"""DINOv2 converters: official layout (plain and BlockChunk), transformers state_dicts and directories, UniMatch V2
checkpoints; variant inference and checks; refusal of wrong, truncated and foreign files; the CLI; loading without
torch."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from zsp_jax.models.dinov2 import (
    VARIANTS,
    Dinov2Config,
    convert_checkpoint,
    convert_state_dict,
    infer_config,
    load_dinov2,
    read_dinov2_config,
    unchunk_blocks,
)
from zsp_jax.models.dinov2.convert import expected_shapes, official_rules
from zsp_jax.references import dinov2 as ref_lib
from zsp_jax.utils.weights import ConversionError, flat_weights, load_weights
from zsp_jax.utils.weights import convert_state_dict as convert_by_rules  # the Rule-table one (not DINOv2's)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_dinov2.py")
CONFIG = Dinov2Config.tiny(registers=4, ffn="swiglu")  # every kind of tensor: registers, w12 / w3


@pytest.fixture(scope="module")
def reference():
    return ref_lib.hf_model(CONFIG, seed=7)


@pytest.fixture(scope="module")
def expected(reference):
    """Our weights for the reference, straight from its official-layout state_dict in memory."""
    return convert_state_dict(ref_lib.official_state_dict(reference), "official", variant=CONFIG).weights


def _assert_same(weights, expected):
    assert set(weights) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(weights[k], expected[k], err_msg=k)


def _v2_entry(reference, seed):
    """A V2 segmenter state_dict as DDP saves it: module.backbone.* (official layout) and module.head.*."""
    gen = torch.Generator().manual_seed(seed)
    sd = {f"module.backbone.{k}": v for k, v in ref_lib.official_state_dict(reference).items()}
    sd["module.head.projects.0.weight"] = torch.randn(8, CONFIG.embed_dim, 1, 1, generator=gen)
    sd["module.head.scratch.output_conv.2.bias"] = torch.randn(3, generator=gen)
    return sd


def test_official_layout_file_and_round_trip(tmp_path, reference, expected):
    src = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(ref_lib.official_state_dict(reference), src)
    converted = convert_checkpoint(src, variant=CONFIG)
    assert (converted.source_format, converted.entry, converted.config) == ("official", None, CONFIG)
    _assert_same(converted.weights, expected)
    # the mask token is kept (unused by the forward) and q/k/v come from the fused qkv
    assert converted.weights["mask_token"].shape == (1, CONFIG.embed_dim)
    qkv = ref_lib.official_state_dict(reference)["blocks.1.attn.qkv.weight"].numpy()
    np.testing.assert_array_equal(converted.weights["blocks.1.attn.k.kernel"], qkv[32:64].T)

    out = tmp_path / "tiny.safetensors"
    converted.save(out)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert meta["zsp_jax.model"] == "dinov2" and meta["zsp_jax.variant"] == "custom"
    assert Dinov2Config.from_json(meta["zsp_jax.config"]) == CONFIG == read_dinov2_config(out)
    model = load_dinov2(out)
    assert model.config == CONFIG
    _assert_same(flat_weights(model), expected)

    # without a variant the tiny architecture is no named one: refused unless allowed (heads do not show in shapes)
    with pytest.raises(ConversionError, match="describe no DINOv2 variant"):
        convert_checkpoint(src)
    custom = convert_checkpoint(src, allow_custom=True, num_heads=2)
    assert custom.config == Dinov2Config(**{**CONFIG.__dict__, "name": "custom"})


def test_block_chunk_layout(reference, expected):
    chunked = ref_lib.official_state_dict(reference, block_chunks=2)
    assert "blocks.1.3.attn.qkv.weight" in chunked and "blocks.3.attn.qkv.weight" not in chunked
    _assert_same(convert_state_dict(chunked, "official", variant=CONFIG).weights, expected)


def test_transformers_layouts(tmp_path, reference, expected):
    # transformers 5's in-memory names (q_proj, gate_proj / up_proj / down_proj)
    _assert_same(convert_state_dict(reference.state_dict(), "hf", variant=CONFIG).weights, expected)
    # a saved directory holds the Hub layout (attention.attention.query, mlp.weights_in); heads from config.json
    directory = tmp_path / "hf"
    reference.save_pretrained(directory)
    converted = convert_checkpoint(directory, allow_custom=True)
    assert converted.source_format == "hf" and converted.config.num_heads == CONFIG.num_heads
    _assert_same(converted.weights, expected)
    # a state_dict file in the transformers layout
    torch.save(reference.state_dict(), tmp_path / "hf_state.bin")
    converted = convert_checkpoint(tmp_path / "hf_state.bin", variant=CONFIG)
    assert converted.source_format == "hf"
    _assert_same(converted.weights, expected)


def test_unimatch_v2_checkpoint(tmp_path, reference, expected):
    ema = ref_lib.hf_model(CONFIG, seed=8)
    ema_weights = convert_state_dict(ref_lib.official_state_dict(ema), "official", variant=CONFIG).weights
    checkpoint = {"model": _v2_entry(reference, 0), "model_ema": _v2_entry(ema, 1),
                  "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                                "param_groups": [{"lr": 5e-6, "params": [0]}]},
                  # V2 keeps its best mIoU as np.mean(...) results: numpy scalars, which weights_only loading refuses
                  # unless allowed
                  "epoch": 3, "previous_best": np.float64(80.0), "previous_best_ema": np.mean(np.array([81.0])),
                  "best_epoch": 2, "best_epoch_ema": 3}
    path = tmp_path / "latest.pth"
    torch.save(checkpoint, path)
    converted = convert_checkpoint(path, variant=CONFIG)  # default: the EMA model, what V2 reports
    assert (converted.source_format, converted.entry) == ("unimatch_v2", "model_ema")
    _assert_same(converted.weights, ema_weights)
    converted = convert_checkpoint(path, variant=CONFIG, entry="model")
    assert converted.entry == "model"
    _assert_same(converted.weights, expected)
    out = tmp_path / "encoder.safetensors"
    converted.save(out)
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata()["zsp_jax.source_entry"] == "model"

    # supervised.py saves no EMA model: the default falls back to "model"; asking for model_ema names the entries
    torch.save({"model": checkpoint["model"], "epoch": 1}, tmp_path / "supervised.pth")
    assert convert_checkpoint(tmp_path / "supervised.pth", variant=CONFIG).entry == "model"
    with pytest.raises(ConversionError, match=r"no 'model_ema' entry \(entries: \['epoch', 'model'\]\)"):
        convert_checkpoint(tmp_path / "supervised.pth", variant=CONFIG, entry="model_ema")
    # a bare segmenter state_dict without DDP prefixes
    torch.save({k.removeprefix("module."): v for k, v in checkpoint["model"].items()}, tmp_path / "bare.pth")
    bare = convert_checkpoint(tmp_path / "bare.pth", variant=CONFIG)
    assert (bare.source_format, bare.entry) == ("unimatch_v2", None)
    _assert_same(bare.weights, expected)
    # a tensor that is neither encoder nor head is refused by name
    torch.save({**checkpoint["model"], "module.aux.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"match no rule[\s\S]*aux\.weight"):
        convert_checkpoint(tmp_path / "extra.pth", variant=CONFIG)


def test_wrong_variant_names_the_differences(reference):
    sd = ref_lib.official_state_dict(reference)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, "official", variant="vit_s14", source_name="tiny.pth")
    message = str(e.value)
    assert "tiny.pth" in message and "not vit_s14" in message
    for line in ("embed_dim: file 32, vit_s14 384", "depth: file 4, vit_s14 12", "num_register_tokens: file 4, vit_s14 0",
                 "ffn: file swiglu, vit_s14 mlp"):
        assert line in message
    assert "shape mismatches" in message and "cls_token (1, 1, 32)" in message
    # the same architecture without registers
    with pytest.raises(ConversionError, match="num_register_tokens: file 4, tiny 0"):
        convert_state_dict(sd, "official", variant=Dinov2Config.tiny(ffn="swiglu"))


@pytest.mark.parametrize("name", VARIANTS)
def test_named_variants_inferred_from_shapes(name):
    """transformers' models of every released size (built on the meta device: shapes only) read as that variant."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = Dinov2Config.from_name(name)
    with torch.device("meta"):
        model = (Dinov2WithRegistersModel if config.num_register_tokens else Dinov2Model)(ref_lib.hf_config(config))
    stand_ins = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref_lib.official_state_dict(model).items()}
    assert infer_config(stand_ins) == config
    chunked = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
               for k, v in ref_lib.official_state_dict(model, block_chunks=4).items()}
    assert infer_config(unchunk_blocks(chunked)) == config
    if name in ("vit_s14", "vit_s14_reg4"):  # every rule and shape, on the smallest real model
        weights = convert_by_rules(stand_ins, official_rules(), expected_shapes(config), source_name=name)
        assert set(weights) == set(expected_shapes(config))


def test_refuses_truncated_and_foreign_files(tmp_path, reference):
    good = tmp_path / "good.pth"
    torch.save(ref_lib.official_state_dict(reference), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated.pth"):
        convert_checkpoint(tmp_path / "truncated.pth", variant=CONFIG)
    torch.save({"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ConversionError, match=r"foreign.pth: not a DINOv2 checkpoint"):
        convert_checkpoint(tmp_path / "foreign.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ConversionError, match="empty.pth"):
        convert_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_checkpoint(tmp_path / "missing.pth")

    sd = ref_lib.official_state_dict(reference)
    without_block = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    with pytest.raises(ConversionError, match=r"blocks \[2\] are missing"):
        convert_state_dict(without_block, "official", variant=CONFIG)
    without_last = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}
    with pytest.raises(ConversionError, match="depth: file 3, tiny 4"):
        convert_state_dict(without_last, "official", variant=CONFIG)
    without_norm = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(ConversionError, match=r"does not provide[\s\S]*norm\.scale"):
        convert_state_dict(without_norm, "official", variant=CONFIG)

    directory = tmp_path / "vit"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ConversionError, match="model_type is 'vit'"):
        convert_checkpoint(directory)


def test_load_needs_no_torch(tmp_path, reference):
    out = tmp_path / "tiny.safetensors"
    convert_state_dict(ref_lib.official_state_dict(reference), "official", variant=CONFIG).save(out)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import jax.numpy as jnp\n"
            "from zsp_jax.models.dinov2 import load_dinov2\n"
            f"model = load_dinov2({str(out)!r})\n"
            "levels = model.intermediate_layers(jnp.zeros((1, 56, 42, 3)))\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "print([tuple(l.shape) for l in levels])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str([(1, 12, 32)] * 4)


def test_cli(tmp_path, reference, expected, capsys):
    src = tmp_path / "dinov2_tiny.pth"
    torch.save(ref_lib.official_state_dict(reference), src)
    out = tmp_path / "tiny.safetensors"
    run = subprocess.run([sys.executable, TOOL, str(src), str(out), "--allow-custom", "--num-heads", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "(official)" in run.stdout and "4 registers" in run.stdout
    _assert_same(load_weights(out)[0], expected)

    # a foreign file: exit status 2, one "error:" line naming the file, no traceback
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "foreign.pth")
    run = subprocess.run([sys.executable, TOOL, str(tmp_path / "foreign.pth"), str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "foreign.pth" in errors[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "x.safetensors").exists()

    # in-process: the output guards and a wrong variant
    sys.path.insert(0, os.path.dirname(TOOL))
    try:
        import convert_dinov2
    finally:
        sys.path.remove(os.path.dirname(TOOL))
    capsys.readouterr()
    assert convert_dinov2.main([str(src), str(src)]) == 2
    assert "is the source checkpoint" in capsys.readouterr().err
    assert convert_dinov2.main([str(src), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert convert_dinov2.main([str(src), str(tmp_path / "b.safetensors"), "--variant", "base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not vit_b14" in err and "embed_dim: file 32, vit_b14 768" in err

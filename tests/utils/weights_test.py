"""The conversion framework's guards: every tensor consumed, every target produced, shapes checked."""

import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.references.torch_utils import randomize_
from zsp_jax.utils import weights


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
        self.norm = nnx.BatchNorm(2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # non-weight RNG state must survive build_with_weights

    def __call__(self, x):
        return self.norm(self.layers[1](self.layers[0](x)), use_running_average=True)


RULES = [
    weights.Rule(r"([01])\.weight", r"layers.\1.kernel", weights.linear),
    weights.Rule(r"([01])\.bias", r"layers.\1.bias"),
    weights.Rule(r"2\.weight", "norm.scale"),
    weights.Rule(r"2\.bias", "norm.bias"),
    weights.Rule(r"2\.running_mean", "norm.mean"),
    weights.Rule(r"2\.running_var", "norm.var"),
]
DROP = [r".*num_batches_tracked"]


@pytest.fixture
def reference():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    return randomize_(model, seed=1).eval()


@pytest.fixture
def expected():
    return weights.flat_shapes(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))


def test_convert_load_and_match_reference(reference, expected, tmp_path):
    converted = weights.convert_state_dict(reference.state_dict(), RULES, expected, source_name="toy", drop=DROP)
    assert set(converted) == set(expected)
    path = tmp_path / "toy.safetensors"
    weights.save_weights(path, converted, {"zsp_jax.model": "toy"})
    loaded, meta = weights.load_weights(path, expect={"zsp_jax.model": "toy"})
    model = weights.build_with_weights(lambda: Tiny(nnx.Rngs(0)), loaded, source_name=str(path))
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    ours = np.asarray(model(x))
    ref = reference(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert meta["zsp_jax.format"] == weights.FORMAT_VERSION
    # the round trip through the file is lossless
    np.testing.assert_array_equal(weights.flat_weights(model)["layers.0.kernel"], converted["layers.0.kernel"])


def test_every_problem_is_reported_at_once(reference, expected):
    source = dict(reference.state_dict())
    source["1.weight"] = torch.zeros(5, 4)  # wrong shape
    del source["0.bias"]  # missing
    source["extra.weight"] = torch.zeros(1)  # unknown
    with pytest.raises(weights.ConversionError) as err:
        weights.convert_state_dict(source, RULES, expected, source_name="bad.pth", drop=DROP)
    msg = str(err.value)
    assert "bad.pth" in msg
    assert "1.weight (5, 4) -> layers.1.kernel (4, 5), expected (4, 2)" in msg
    assert "layers.0.bias" in msg
    assert "extra.weight" in msg
    # a shape mismatch is not also reported as a missing weight
    assert msg.count("layers.1.kernel") == 1


def test_ambiguous_rules_are_a_bug(reference, expected):
    rules = RULES + [weights.Rule(r"\d\.bias", "norm.bias")]
    with pytest.raises(weights.ConversionError, match="several rules"):
        weights.convert_state_dict(reference.state_dict(), rules, expected, source_name="toy", drop=DROP)


def test_split_rule_produces_several_targets():
    fused = np.arange(12, dtype=np.float32).reshape(6, 2)
    rule = weights.Rule(r"in_proj", ("q", "k", "v"), weights.split(3, then=weights.linear))
    out = weights.convert_state_dict({"in_proj": fused}, [rule], {"q": (2, 2), "k": (2, 2), "v": (2, 2)},
                                     source_name="s")
    np.testing.assert_array_equal(out["k"], fused[2:4].T)


def test_conv_transforms_match_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 7, 7)).astype(np.float32)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    import jax

    ours = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), weights.conv2d(w), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
    # transposed convolution, stride 2 (SAM's output upscaling uses kernel 2, stride 2)
    wt = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    ref_t = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(wt), stride=2).numpy()
    ours_t = jax.lax.conv_transpose(x.transpose(0, 2, 3, 1), weights.conv_transpose2d(wt), (2, 2), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(ours_t).transpose(0, 3, 1, 2), ref_t, rtol=1e-5, atol=1e-5)


def test_assign_weights_casts_params_not_statistics(reference, expected):
    converted = weights.convert_state_dict(reference.state_dict(), RULES, expected, source_name="toy", drop=DROP)
    import jax.numpy as jnp

    model = weights.build_with_weights(lambda: Tiny(nnx.Rngs(0)), converted, source_name="toy", dtype=jnp.bfloat16)
    assert model.layers[0].kernel.dtype == jnp.bfloat16
    assert model.norm.mean.dtype == jnp.float32


def test_assign_weights_is_strict(reference, expected):
    converted = weights.convert_state_dict(reference.state_dict(), RULES, expected, source_name="toy", drop=DROP)
    converted["unexpected"] = np.zeros(1, np.float32)
    del converted["norm.var"]
    with pytest.raises(weights.ConversionError, match="norm.var") as err:
        weights.assign_weights(Tiny(nnx.Rngs(0)), converted, source_name="w.safetensors")
    assert "unexpected" in str(err.value)


def test_bad_files_name_the_culprit(tmp_path, reference):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        weights.load_torch_checkpoint(tmp_path / "nowhere.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(weights.ConversionError, match="empty.pth: the file is empty"):
        weights.load_torch_checkpoint(empty)
    full = tmp_path / "full.pth"
    torch.save(reference.state_dict(), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(weights.ConversionError, match="truncated.pth: not a readable PyTorch checkpoint"):
        weights.load_torch_checkpoint(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(weights.ConversionError, match="notes.safetensors: not a readable safetensors"):
        weights.load_weights(text)


def test_load_weights_checks_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    weights.save_weights(path, {"a": np.zeros(2, np.float32)}, {"zsp_jax.model": "clip"})
    with pytest.raises(weights.ConversionError, match="zsp_jax.model is 'clip', expected 'sam'"):
        weights.load_weights(path, expect={"zsp_jax.model": "sam"})
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(foreign))
    with pytest.raises(weights.ConversionError, match="not a zsp_jax weights file"):
        weights.load_weights(foreign)


def test_unwrap_state_dict():
    sd = {"module.backbone.w": torch.zeros(1)}
    assert list(weights.unwrap_state_dict({"model": sd, "epoch": 3}, path="p")) == ["backbone.w"]
    assert list(weights.unwrap_state_dict({"state_dict": {"model": sd}}, path="p")) == ["backbone.w"]
    with pytest.raises(weights.ConversionError, match="ckpt.pth: does not contain a state_dict"):
        weights.unwrap_state_dict({"epoch": 3}, path="ckpt.pth")


def test_read_stored_config_checks_the_model_and_reads_no_tensor(tmp_path):
    from zsp_jax.models.dpt import DptConfig

    config = DptConfig.tiny(num_classes=3)
    path = tmp_path / "w.safetensors"
    weights.save_weights(path, {"a": np.zeros(2, np.float32)},
                         {"zsp_jax.model": "unimatch_v2", "zsp_jax.config": config.to_json()})
    assert weights.read_metadata(path)["zsp_jax.model"] == "unimatch_v2"
    assert weights.read_stored_config(path, "unimatch_v2", DptConfig) == config
    with pytest.raises(weights.ConversionError, match="zsp_jax.model is 'unimatch_v2', expected 'dinov2'"):
        weights.read_stored_config(path, "dinov2", DptConfig)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(weights.ConversionError, match="notes.safetensors: not a readable safetensors file"):
        weights.read_stored_config(text, "dinov2", DptConfig)


def test_read_hf_state_dict_reads_shards_lazily_and_names_what_is_missing(tmp_path):
    import json

    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match="a transformers Dinov2Model directory holds config.json"):
        weights.read_hf_state_dict(str(tmp_path), "Dinov2Model")
    parts = {"model-1.safetensors": {"a": np.arange(3, dtype=np.float32)},
             "model-2.safetensors": {"b": np.ones((2, 2), np.float32)}}
    for name, tensors in parts.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {key: name for name, tensors in parts.items() for key in tensors}}))
    state_dict = weights.read_hf_state_dict(str(tmp_path), "Dinov2Model")
    assert isinstance(state_dict, weights.SafetensorsDict) and sorted(state_dict) == ["a", "b"]
    np.testing.assert_array_equal(state_dict["a"], parts["model-1.safetensors"]["a"])
    np.testing.assert_array_equal(state_dict["b"], parts["model-2.safetensors"]["b"])
    torch.save({"c": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").unlink()
    for name in parts:
        (tmp_path / name).unlink()
    assert list(weights.read_hf_state_dict(str(tmp_path), "CLIPModel")) == ["c"]


def test_build_with_random_weights_draws_every_weight_from_the_seed():
    first = weights.flat_weights(weights.build_with_random_weights(lambda: Tiny(nnx.Rngs(0)), seed=3))
    again = weights.flat_weights(weights.build_with_random_weights(lambda: Tiny(nnx.Rngs(0)), seed=3))
    other = weights.flat_weights(weights.build_with_random_weights(lambda: Tiny(nnx.Rngs(0)), seed=4))
    assert first.keys() == again.keys() == other.keys() and "layers.0.kernel" in first
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key]), key
        assert np.all(np.isfinite(first[key])) and np.all(first[key] != 0), key  # drawn, not initialised to 0/1
    kernel = first["layers.0.kernel"]  # (3, 4): N(0, 1/3)
    assert kernel.shape == (3, 4) and np.max(np.abs(kernel)) < 5 / np.sqrt(3)
    assert np.all(np.abs(first["norm.scale"] - 1) < 0.5) and np.all(first["norm.var"] >= 1)  # variances positive

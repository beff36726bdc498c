"""The UniMatch V2 converter: checkpoints laid out as ``unimatch_v2.py`` / ``supervised.py`` save them
(DDP ``module.`` prefixes, ``model`` / ``model_ema`` entries), built from the reference with every
tensor randomised; the entry choice, the config read from the tensors, the saved ``.safetensors``
(metadata, loading without torch), and the errors for files that do not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.dpt.helpers import dinov2_reference, nchw_to_nhwc, nhwc_to_nchw, random_images, v2_state_dict
from zsp_jax.models.dinov2 import Dinov2Config
from zsp_jax.models.dpt import DptConfig, DptHeadConfig
from zsp_jax.models.dpt import convert as cv
from zsp_jax.references import unimatch_v2_model as ref_lib
from zsp_jax.utils.bench import relative_error
from zsp_jax.utils.weights import ConversionError, load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = DptConfig.tiny()
FP32_TOL = 1e-4


def _logits(model, x):
    return np.asarray(nnx.jit(lambda m, a: m(a))(model, jnp.asarray(x)))


def _ref_logits(ref, x):
    with torch.no_grad():
        return nchw_to_nhwc(ref(nhwc_to_nchw(x)))


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """A ``latest.pth`` as unimatch_v2.py writes it: student and EMA teacher (different weights), DDP keys."""
    student, teacher = dinov2_reference(CONFIG, seed=1), dinov2_reference(CONFIG, seed=2)
    path = str(tmp_path_factory.mktemp("v2") / "latest.pth")
    torch.save({"model": v2_state_dict(student, prefix="module."),
                "model_ema": v2_state_dict(teacher, prefix="module."),
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6}]}, "epoch": 3, "previous_best": 80.0,
                "previous_best_ema": 81.0, "best_epoch": 2, "best_epoch_ema": 3}, path)
    return path, student, teacher


def test_default_entry_is_the_ema_model(v2_checkpoint):
    path, student, teacher = v2_checkpoint
    x = random_images(2, 98, 126, seed=3)
    converted = cv.convert_checkpoint(path, CONFIG)
    assert converted.entry == "model_ema"
    assert relative_error(_logits(converted.build(), x), _ref_logits(teacher, x)) <= FP32_TOL
    student_model = cv.convert_checkpoint(path, CONFIG, entry="model")
    assert student_model.entry == "model"
    assert relative_error(_logits(student_model.build(), x), _ref_logits(student, x)) <= FP32_TOL
    # the two entries really differ, so the choice is tested
    assert relative_error(_ref_logits(student, x), _ref_logits(teacher, x)) > 1e-2


def test_supervised_checkpoint_has_only_the_model(tmp_path):
    """supervised.py saves {"model", "optimizer", "epoch", "previous_best"}: the default takes "model",
    asking for the EMA is an error naming the entries."""
    ref = dinov2_reference(CONFIG, seed=4)
    path = str(tmp_path / "best.pth")
    torch.save({"model": v2_state_dict(ref, prefix="module."), "optimizer": {}, "epoch": 0, "previous_best": 1.0},
               path)
    converted = cv.convert_checkpoint(path, CONFIG)
    assert converted.entry == "model"
    x = random_images(1, 98, 98, seed=5)
    assert relative_error(_logits(converted.build(), x), _ref_logits(ref, x)) <= FP32_TOL
    with pytest.raises(ConversionError, match="model_ema"):
        cv.convert_checkpoint(path, CONFIG, entry="model_ema")


def test_saved_file_loads_without_torch(v2_checkpoint, tmp_path):
    path, _, teacher = v2_checkpoint
    converted = cv.convert_checkpoint(path, CONFIG, lock_backbone=True)
    out = str(tmp_path / "v2_tiny.safetensors")
    converted.save(out)
    _, meta = load_weights(out)
    assert meta["zsp_jax.model"] == "unimatch_v2"
    assert meta["zsp_jax.source_entry"] == "model_ema"
    assert DptConfig.from_json(meta["zsp_jax.config"]) == CONFIG  # the given config (lock_backbone False) is kept
    assert cv.read_config(out) == CONFIG
    x = random_images(1, 98, 126, seed=6)
    expected = _ref_logits(teacher, x)
    assert relative_error(_logits(cv.load_model(out), x), expected) <= FP32_TOL
    assert cv.load_model(out, lock_backbone=True).config.lock_backbone
    # a fresh interpreter in which importing torch fails
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, jax.numpy as jnp\n"
        "from zsp_jax.models.dpt.convert import load_model\n"
        f"model = load_model({out!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(model(jnp.asarray(np.load({str(tmp_path / 'x.npy')!r})))))\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=300)
    assert relative_error(np.load(tmp_path / "y.npy"), expected) <= FP32_TOL


def test_command_line_tool_writes_the_whole_segmenter(v2_checkpoint, tmp_path, capsys):
    """tools/convert_unimatch_v2.py: the entry asked for, the same logits after loading; a mistake is one
    ``error:`` line and exit code 2, nothing written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_unimatch_v2", os.path.join(ROOT, "tools",
                                                                                      "convert_unimatch_v2.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path, student, _ = v2_checkpoint
    out = tmp_path / "student.safetensors"
    assert tool.main([path, str(out), "--entry", "model", "--allow-custom"]) == 0
    assert "[model]" in capsys.readouterr().out
    x = random_images(1, 98, 126, seed=7)
    assert relative_error(_logits(cv.load_model(str(out)), x), _ref_logits(student, x)) <= FP32_TOL
    for argv, culprit in (([path, str(tmp_path / "a.safetensors")], "--allow-custom"),  # a tiny encoder: no name
                          ([path, path, "--allow-custom"], "is the source checkpoint"),
                          ([str(tmp_path / "missing.pth"), str(tmp_path / "b.safetensors")], "missing.pth")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and culprit in err, err  # one error line (details may follow it)
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_config_read_from_tensors(v2_checkpoint):
    """Without a config: the head from its shapes, the encoder from the DINOv2 converter (a tiny
    encoder is no named variant: refused unless allow_custom)."""
    path, _, _ = v2_checkpoint
    with pytest.raises(ConversionError, match="allow_custom"):
        cv.convert_checkpoint(path)
    converted = cv.convert_checkpoint(path, allow_custom=True)
    assert converted.config.head == CONFIG.head
    assert converted.config.encoder.embed_dim == CONFIG.encoder.embed_dim
    assert converted.config.variant == "custom"


def test_mismatches_are_named(v2_checkpoint, tmp_path):
    path, _, teacher = v2_checkpoint
    with pytest.raises(ConversionError, match="num_classes: the file has 5, the config asks for 7"):
        cv.convert_checkpoint(path, DptConfig.tiny(num_classes=7))
    with pytest.raises(ConversionError, match="features"):
        cv.convert_checkpoint(path, CONFIG.replace(head=CONFIG.head.replace(features=16)))
    sd = v2_state_dict(teacher)
    # a truncated head: the missing tensor is listed
    truncated = {k: v for k, v in sd.items() if k != "head.scratch.refinenet2.resConfUnit1.conv2.bias"}
    with pytest.raises(ConversionError, match=r"refine\.1\.skip_unit\.conv2\.bias"):
        cv.convert_segmenter_state_dict(truncated, CONFIG)
    # a stray tensor is not silently ignored
    with pytest.raises(ConversionError, match="head.extra"):
        cv.convert_segmenter_state_dict({**sd, "head.extra.weight": torch.zeros(3)}, CONFIG)
    # refinenet4's unused residual unit is dropped on purpose, nothing else
    weights = cv.convert_segmenter_state_dict(sd, CONFIG).weights
    assert not any(k.startswith("head.refine.3.skip_unit") for k in weights)
    # a DINOv2 encoder file is not a segmenter
    encoder_only = str(tmp_path / "dinov2.pth")
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, encoder_only)
    with pytest.raises(ConversionError, match="not a UniMatch V2 segmenter"):
        cv.convert_checkpoint(encoder_only, CONFIG)


def test_batchnorm_head_is_refused():
    head = ref_lib.DPTHead(5, 16, 8, use_bn=True, out_channels=[4, 6, 8, 12])
    with pytest.raises(ConversionError, match="use_bn=True"):
        cv.convert_head(head.state_dict(), src="")
    with pytest.raises(ValueError, match="use_bn"):
        DptHeadConfig.tiny(use_bn=True)


@pytest.mark.full_size
def test_real_small_checkpoint_reads_as_dinov2_small(tmp_path):
    """A V2 DINOv2-S checkpoint (VOC, 21 classes) with real widths: the config is read from the tensors
    (V2's widths and block indices for ``small``) and the logits match at a 7x9 patch grid."""
    config = DptConfig.small(num_classes=21)
    ref = dinov2_reference(config, seed=7)
    path = str(tmp_path / "latest.pth")
    sd = v2_state_dict(ref, prefix="module.")
    torch.save({"model": sd, "model_ema": sd}, path)
    converted = cv.convert_checkpoint(path)
    assert converted.config == config
    assert converted.config.variant == "dinov2_small"
    assert converted.config.encoder == Dinov2Config.from_name("small")
    assert converted.config.intermediate_indices == (2, 5, 8, 11)
    x = random_images(1, 98, 126, seed=8)
    assert relative_error(_logits(converted.build(), x), _ref_logits(ref, x)) <= FP32_TOL
    out = str(tmp_path / "small.safetensors")
    converted.save(out)
    assert json.loads(load_weights(out)[1]["zsp_jax.config"])["head"]["out_channels"] == [48, 96, 192, 384]

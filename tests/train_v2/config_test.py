"""The UniMatch V2 configs (``configs/voc_v2.py``, ``coco_v2.py``, ``ade20k_v2.py``, ``smoke.py:family=v2``): V2's
values as overrides, their variants, and the start-up checks of ``model.family=unimatch_v2`` naming the field."""

from __future__ import annotations

import importlib.util
import os

import pytest

from zsp_jax.train import config as train_config
from zsp_jax.train import state as state_lib
from zsp_jax.train import v2_state, v2_step

from .conftest import REPO

V2_CONFIGS = ("configs/voc_v2.py", "configs/coco_v2.py", "configs/ade20k_v2.py")


def _module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", V2_CONFIGS)
def test_v2_configs_state_v2s_values_and_variants(path):
    mod = _module(path)
    assert f"python -m zsp_jax.main --config {path}:encoder=s" in mod.__doc__
    c = mod.get_config()
    t, m = c.train, c.model
    assert (m.family, m.encoder, t.crop_size, t.lr, t.head_lr_multiplier, t.weight_decay) == \
        ("unimatch_v2", "s", 518, 5e-6, 40.0, 0.01)
    assert (t.adam_betas, t.ema_cap, t.loss_groups, c.eval.weights, c.eval.mode) == ((0.9, 0.999), 0.996, 4, "ema",
                                                                                      "original")
    assert (t.epochs, t.batch_size, m.lock_backbone) == {"configs/voc_v2.py": (60, 16, False),
                                                        "configs/coco_v2.py": (20, 16, False),
                                                        "configs/ade20k_v2.py": (60, 8, True)}[path]
    assert m.pretrained == "weights/dinov2_vits14_pretrain.pth"
    # the model of each encoder: V2's widths and block indices
    for encoder, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        vc = mod.get_config(f"encoder={encoder},mode=unimatch_v2")
        dpt = v2_state.model_config_v2(vc)
        assert dpt.variant == f"dinov2_{size}" and dpt.num_classes == vc.data.num_classes
        assert vc.model.pretrained.endswith(f"dinov2_vit{encoder}14_pretrain.pth") and vc.train.mode == "unimatch_v2"
        assert dpt.lock_backbone == m.lock_backbone
    for bad in ("encoder=x", "mode=unimatch", "split=7"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            mod.get_config(bad)


def test_smoke_v2_variant():
    mod = _module("configs/smoke.py")
    c = mod.get_config("family=v2")
    assert (c.model.family, c.model.encoder, c.train.crop_size % 14, c.workdir) == ("unimatch_v2", "tiny", 0,
                                                                                   "runs/smoke_v2")
    train_config.validate(c)
    assert isinstance(train_config.step_options(c), v2_step.StepOptionsV2)
    assert mod.get_config().model.family == "deeplab"  # the default stays V1's
    with pytest.raises(ValueError, match="mode"):
        mod.get_config("family=v2,mode=unimatch")


@pytest.mark.parametrize("field, value, message", [
    ("train.mode", "unimatch", r"train\.mode='unimatch': model\.family=unimatch_v2 trains"),
    ("train.enhanced", "relabel", r"train\.enhanced='relabel'"),
    ("train.crop_size", 64, r"train\.crop_size=64.*multiple of 14"),
    ("train.ema_cap", 1.5, r"train\.ema_cap=1\.5"),
    ("train.adam_betas", (0.9, 1.0), r"train\.adam_betas"),
    ("model.encoder", "xl", r"model\.encoder='xl'"),
    ("eval.mode", "center_crop", r"eval\.mode='center_crop'.*no centre-crop"),
    ("eval.weights", "best", r"eval\.weights='best'"),
    ("model.family", "segformer", r"model\.family='segformer'"),
])
def test_v2_fields_are_checked_naming_the_field(field, value, message):
    c = _module("configs/smoke.py").get_config("family=v2")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=message):
        train_config.validate(c)


def test_deeplab_modes_stay_refused_names_and_the_family_dispatch():
    c = _module("configs/smoke.py").get_config()
    c.train.mode = "unimatch_v2"
    with pytest.raises(ValueError, match=r"model\.family=deeplab trains"):
        train_config.validate(c)
    c.train.mode = "unimatch"
    assert state_lib.family(c) == "deeplab" and not isinstance(train_config.step_options(c), v2_step.StepOptionsV2)
    v2 = _module("configs/smoke.py").get_config("family=v2")
    settings = v2_state.optimizer_settings(v2)
    assert (settings.lr, settings.lr_multi, settings.weight_decay, settings.betas) == (2e-4, 10.0, 0.01, (0.9, 0.999))

import importlib.util
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from zsp_jax.data import config as data_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ("configs/voc.py", "configs/coco.py", "configs/smoke.py")


def _module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS)
def test_config_defaults_and_docstring(path):
    mod = _module(path)
    c = mod.get_config()
    assert isinstance(c, ml_collections.ConfigDict)
    assert "python -m zsp_jax.main --config " + path in mod.__doc__  # the command that runs it
    for section in ("data", "train", "data_stage"):
        assert section in c
    assert c.train.crop_size >= 32 and c.data.num_classes in (21, 81)


def test_voc_variants():
    mod = _module("configs/voc.py")
    c = mod.get_config("split=92,backbone=r50,crop=513")
    assert (c.data.split, c.model.backbone, c.train.crop_size) == ("92", "r50", 513)
    for split in mod.SPLITS:
        assert mod.get_config(f"split={split}").data.split == split
    with pytest.raises(ValueError, match="split"):
        mod.get_config("split=100")
    with pytest.raises(ValueError, match="unknown config argument 'epochs'"):
        mod.get_config("epochs=3")
    with pytest.raises(ValueError, match="crop"):
        mod.get_config("crop=big")


def test_coco_variants():
    mod = _module("configs/coco.py")
    assert mod.get_config("split=1_32").data.split == "1_32"
    with pytest.raises(ValueError, match="split"):
        mod.get_config("split=92")


def test_command_line_overrides():
    def parse(*overrides):
        argv = ["prog", f"--config={os.path.join(REPO, 'configs/voc.py')}:split=183", *overrides]
        fv = flags.FlagValues()
        # sys_argv: config_flags declares the --config.* override flags from the command line it is given
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        return fv.config

    c = parse("--config.train.batch_size=16", "--config.data.workers=3", "--config.data.root=/data/voc",
              "--config.train.epochs=40", "--config.train.lr=0.002")
    assert (c.data.split, c.train.batch_size, c.data.workers, c.data.root) == ("183", 16, 3, "/data/voc")
    assert (c.train.epochs, c.train.lr) == (40, 0.002)
    with pytest.raises(Exception, match="no_such_field"):
        parse("--config.train.no_such_field=1")


def _valid_smoke():
    return _module("configs/smoke.py").get_config()


@pytest.mark.parametrize("field, value, message", [
    ("train.crop_size", 31, r"train\.crop_size=31"),
    ("train.batch_size", 0, r"train\.batch_size=0"),
    ("train.epochs", 0, r"train\.epochs=0"),
    ("train.lr", -0.1, r"train\.lr=-0\.1"),
    ("train.momentum", 1.5, r"train\.momentum=1\.5"),
    ("train.conf_thresh", 1.2, r"train\.conf_thresh=1\.2"),
    ("data.source", "web", r"data\.source='web'"),
    ("data.on_bad_input", "ignore", r"data\.on_bad_input='ignore'"),
    ("data.strong_aug", "gpu", r"data\.strong_aug='gpu'"),
    ("data.split", "1/16", r"data\.split='1/16'"),
    ("data.split", "half", r"data\.split='half'.*generated data"),
    ("data.num_classes", 20, r"data\.num_classes=20"),
    ("data.workers", -1, r"data\.workers=-1"),
    ("seed", -1, r"seed=-1"),
])
def test_validation_names_the_field(field, value, message):
    c = _valid_smoke()
    data_config.validate(c)
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    with pytest.raises(ValueError, match=message):
        data_config.validate(c)


def test_validation_of_paths(tmp_path):
    c = _module("configs/voc.py").get_config()
    c.data.root = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"data\.root=.*no such directory"):
        data_config.validate(c)
    c.data.root = str(tmp_path)
    c.data.splits_dir = str(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"data\.split='1464'.*make_splits"):
        data_config.validate(c)

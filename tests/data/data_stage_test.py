import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from zsp_jax.data import preview

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_config(path, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("arg", ["source=folder,workers=0", "source=tfds,workers=0,strong=host"])
def test_data_stage_on_generated_data(tmp_path, arg):
    c = _load_config("configs/smoke.py", arg)
    c.workdir = str(tmp_path / "run")
    c.data.root = str(tmp_path / "data" / "VOC2012")
    c.data.splits_dir = str(tmp_path / "data" / "splits")
    c.data.tfds_dir = str(tmp_path / "data" / "tfds")
    c.train.crop_size, c.train.batch_size = 48, 2
    c.data_stage.num_batches = 3
    summary = preview.run_data_stage(c)
    assert summary["batches"] == 3 and summary["bad_inputs"] == 0
    assert summary["labeled"] == 6 and summary["unlabeled"] == 18
    assert summary["shapes"]["unlabeled"]["image_s1"] == [2, 48, 48, 3]
    picture = Image.open(os.path.join(c.workdir, "preview.png"))
    assert picture.size[0] > 5 * 48 and picture.size[1] > 2 * 48  # 5 columns, one row per element
    assert json.load(open(os.path.join(c.workdir, "input_state.json")))
    assert json.load(open(os.path.join(c.workdir, "bad_input.json")))["count"] == 0
    assert preview.run_data_stage(c)["batches"] == 3  # a second run reuses the data, split, build and scan cache


def test_main_runs_the_smoke_config_with_workers(tmp_path):
    """What `make run` runs: absl app, config file + overrides, Grain worker processes."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "zsp_jax.main", "--config", os.path.join(REPO, "configs/smoke.py:workers=2"),
           f"--config.workdir={out}", f"--config.data.root={out}/data/VOC2012",
           f"--config.data.splits_dir={out}/data/splits", f"--config.data.tfds_dir={out}/data/tfds",
           "--config.stages=data", "--config.data_stage.num_batches=4", "--config.train.crop_size=64"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 4 batches" in res.stdout
    summary = json.load(open(out / "data_stage.json"))
    assert summary["shapes"]["labeled"]["image"] == [4, 64, 64, 3]
    assert "leaked" not in res.stderr


def test_bad_config_names_the_field(tmp_path):
    c = _load_config("configs/smoke.py")
    c.workdir = str(tmp_path / "run")
    c.train.crop_size = 16
    with pytest.raises(ValueError, match=r"train\.crop_size=16"):
        preview.run_data_stage(c)

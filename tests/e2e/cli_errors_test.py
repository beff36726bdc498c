"""Every command answers a mistake with one ``error:`` line naming the flag, field or file, exit code 2, and no
traceback: the main job, the labeller, the evaluator and the tools, each run as a user would (a subprocess)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import data_files
from zsp_jax.models.random_checkpoints import tiny_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the bad invocations: tiny checkpoints, an image folder, bad files of every kind."""
    base = tmp_path_factory.mktemp("cli")
    sam, clip = tiny_checkpoints(str(base / "weights"))
    images = base / "images"
    images.mkdir()
    for name, seed in (("a.jpg", 1), ("b.png", 2)):
        Image.fromarray(data_files.rgb_array(40, 56, seed)).save(images / name)
    gt_rgb = base / "gt_rgb"
    data_files.rgb_mask_png(str(gt_rgb / "a.png"))
    (base / "a_file").write_text("not a folder")
    (base / "classes_bad.txt").write_bytes(b"\xff\x00\x80cat")
    import collections

    import torch

    # A pickled object of a class torch does not load safely (as a whole training script's state would be).
    torch.save({"weights": torch.zeros(2), "extra": collections.Counter("ab")}, base / "random.pth")
    from zsp_jax.references.checkpoints import pytorch_checkpoints

    _, open_clip_bin = pytorch_checkpoints(str(base / "torch_weights"))
    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.references.deeplab import torch_reference

    reference = torch_reference(DeepLabConfig.tiny_resnet(num_classes=21))
    backbone = {k[len("backbone."):]: v for k, v in reference.state_dict().items() if k.startswith("backbone.")}
    torch.save(backbone, base / "backbone_only.pth")
    (base / "out_dir").mkdir()
    (base / "labels_no_segments").mkdir()
    (base / "labels_no_segments" / "classes.json").write_text('{"names": ["background", "cat"]}')
    return {"base": str(base), "sam": sam, "clip": clip, "images": str(images), "open_clip_bin": open_clip_bin}


def _label(f, *args):
    return [sys.executable, "-m", "zsp_jax.label", f"--sam={f['sam']}", f"--clip={f['clip']}", "--quiet",
            f"--out={f['base']}/label_out", *args]


def _main(f, *args):
    return [sys.executable, "-m", "zsp_jax.main", f"--config.workdir={f['base']}/main_run", *args]


def _evaluate(f, *args):
    return [sys.executable, "-m", "zsp_jax.evaluate", f"--config.workdir={f['base']}/eval_run", *args]


# (case id, argv builder, text the error line must contain)
CASES = [
    ("main unknown field", lambda f: _main(f, "--config.train.learning_rate=0.1"), "did you mean train.lr?"),
    ("main misspelt field", lambda f: _main(f, "--config.label.thresold=0.2"), "did you mean label.threshold?"),
    ("main missing config file", lambda f: _main(f, "--config=configs/nope.py"), "no such config file"),
    ("main missing config file alone", lambda f: [sys.executable, "-m", "zsp_jax.main", "--config=configs/nope.py"],
     "no such config file"),
    ("main bad variant", lambda f: _main(f, "--config=configs/smoke.py:mode=zps"), "mode='zps'"),
    ("main bad value", lambda f: _main(f, "--config.train.epochs=abc"), "--config.train.epochs"),
    ("main stray argument", lambda f: _main(f, "stray"), "unexpected argument"),
    ("main unwritable workdir", lambda f: [sys.executable, "-m", "zsp_jax.main", "--config.workdir=/proc/zsp_jax_run"],
     "config.workdir"),
    ("main workdir is a file", lambda f: [sys.executable, "-m", "zsp_jax.main", f"--config.workdir={f['base']}/a_file"],
     "config.workdir"),
    ("evaluate missing checkpoint", lambda f: _evaluate(f, "--checkpoint=/nonexistent/run"), "--checkpoint"),
    ("evaluate backbone-only file", lambda f: _evaluate(f, f"--checkpoint={f['base']}/backbone_only.pth"),
     "only a backbone"),
    ("evaluate output is a folder", lambda f: _evaluate(f, f"--output={f['base']}/out_dir"), "--output"),
    ("evaluate nothing trained", lambda f: _evaluate(f), "no checkpoint"),
    ("label eval without gt", lambda f: _label(f, f"--images={f['images']}", "--eval"), "--eval"),
    ("label missing gt", lambda f: _label(f, f"--images={f['images']}", "--gt=/nonexistent"), "--gt=/nonexistent"),
    ("label sweep not numbers", lambda f: _label(f, f"--images={f['images']}", "--sweep=abc"), "--sweep=abc"),
    ("label sweep empty range", lambda f: _label(f, f"--images={f['images']}", "--sweep=0.5:0.1:0.1"),
     "--sweep=0.5:0.1:0.1"),
    ("label sweep without gt", lambda f: _label(f, f"--images={f['images']}", "--sweep=0.1:0.2:0.1"), "--gt"),
    ("label rgb ground truth", lambda f: _label(f, f"--images={f['images']}", f"--gt={f['base']}/gt_rgb"),
     "a.png: mask has mode RGB"),
    ("label out is a file", lambda f: _label(f, f"--images={f['images']}", f"--out={f['base']}/a_file"), "--out"),
    ("label missing images", lambda f: _label(f, "--images=/nonexistent/a.jpg"), "--images"),
    ("label undecodable class file", lambda f: _label(f, f"--images={f['images']}",
                                                      f"--classes={f['base']}/classes_bad.txt"), "classes_bad.txt"),
    ("label not a checkpoint", lambda f: _label(f, f"--images={f['images']}", f"--sam={f['base']}/random.pth"),
     "--sam="),
    ("label open_clip without model name", lambda f: _label(f, f"--images={f['images']}",
                                                            f"--clip={f['open_clip_bin']}"), "--clip_model_name"),
    ("label misspelt field", lambda f: _label(f, f"--images={f['images']}", "--config.label.thresold=3"),
     "did you mean label.threshold?"),
    ("tool sweep without segments", lambda f: [sys.executable, "tools/eval_pseudo_labels.py",
                                               f"--out={f['base']}/labels_no_segments", "--gt=/tmp", "--sweep=0.1:0.2:0.1"],
     "segments/"),
    ("tool bad argument", lambda f: [sys.executable, "tools/convert_sam.py"], "convert_sam.py"),
    ("tool missing file", lambda f: [sys.executable, "tools/convert_sam.py", "/nonexistent.pth",
                                     f"{f['base']}/x.safetensors"], "/nonexistent.pth"),
    ("tool output is its source", lambda f: [sys.executable, "tools/convert_backbone.py", f"{f['base']}/random.pth",
                                             f"{f['base']}/random.pth"], "random.pth"),
    ("tool foreign file", lambda f: [sys.executable, "tools/convert_dinov2.py", f"{f['base']}/random.pth",
                                     f"{f['base']}/x.safetensors"], "random.pth"),
]


def _run(argv, **kwargs):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env.pop("ZSP_JAX_TRACEBACK", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def _assert_one_error_line(r, culprit):
    output = r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, (r.returncode, output[-3000:])
    assert "Traceback" not in output and "Logging error" not in output, output[-3000:]
    assert len(errors) == 1, errors
    assert culprit in errors[0], (culprit, errors[0])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_with_exit_code_2(case, files):
    _, argv, culprit = case
    _assert_one_error_line(_run(argv(files)), culprit)


def test_a_traceback_when_asked_for(files):
    env = dict(os.environ, ZSP_JAX_TRACEBACK="1")
    r = subprocess.run(_evaluate(files, "--checkpoint=/nonexistent/run"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_that_fails_mid_run_is_one_line_without_logging_noise(files, tmp_path):
    # The file-size limit stands in for a full disk: every write past 200 kB fails, the library log file's
    # included (which printed ~1,000 lines of "--- Logging error ---" before).
    r = _run([sys.executable, "-m", "zsp_jax.main", f"--config.workdir={tmp_path}/run",
              f"--config.synthetic.checkpoints={tmp_path}/weights", f"--config.data.root={tmp_path}/data/VOC2012",
              f"--config.data.splits_dir={tmp_path}/data/splits", f"--config.data.tfds_dir={tmp_path}/data/tfds",
              f"--config.label.sam_checkpoint={tmp_path}/weights/sam_tiny.safetensors",
              f"--config.label.clip_checkpoint={tmp_path}/weights/clip_tiny.safetensors"],
             preexec_fn=_file_size_limit(200_000))
    _assert_one_error_line(r, "cannot write")


def test_an_error_after_the_input_workers_started_is_one_line(tmp_path):
    # Diverging at once (lr 1e30) stops the run with the input pipeline's 2 worker processes running: they end
    # quietly (no Grain shutdown tracebacks, no leaked shared memory warnings).
    r = _run([sys.executable, "-m", "zsp_jax.main", "--config=configs/smoke.py:mode=supervised,workers=2",
              "--config.stages=train", f"--config.workdir={tmp_path}/run", "--config.synthetic.checkpoints=",
              f"--config.data.root={tmp_path}/data/VOC2012", f"--config.data.splits_dir={tmp_path}/data/splits",
              f"--config.data.tfds_dir={tmp_path}/data/tfds", "--config.train.lr=1e30",
              "--config.train.max_steps=4", "--config.eval.every_epochs=0", "--config.eval.at_end=False"])
    _assert_one_error_line(r, "training diverged at step")
    assert "leaked" not in r.stderr and "resource_tracker" not in r.stderr, r.stderr[-3000:]
    assert np.all([not line.startswith(("Exception", "  File")) for line in r.stderr.splitlines()])

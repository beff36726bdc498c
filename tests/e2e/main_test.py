"""The main job end to end: the README's run command on the smoke config, its rerun, its training killed with
SIGKILL and rerun (the smoke run's state bit for bit), configs/voc.py on a generated VOC-layout dataset with
random checkpoints in the PyTorch formats, and the input checks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures.kill import final_state, kill_after_checkpoint

from .conftest import ROOT, run_main as _main


def test_smoke_pipeline_runs_every_stage(smoke):
    cwd, r = smoke
    work = cwd / "runs" / "smoke"
    summary = json.loads((work / "summary.json").read_text())
    assert summary["stages"] == ["convert", "label", "train", "eval"]
    assert summary["label"]["labelled_total"] == 18 and (work / "pseudo_labels" / "report.html").exists()
    assert summary["train"]["steps"] > 0 and summary["best_miou"] is not None
    assert summary["eval"]["miou"] == pytest.approx(summary["best_miou"], abs=1e-6)
    for line in ("pseudo labels", "checkpoints", "TensorBoard", "mIoU: final", "summary"):
        assert line in r.stdout
    assert " I1" not in r.stderr and "Unable to initialize backend" not in r.stderr + r.stdout  # library logs -> file
    assert "Unable to initialize backend" in (work / "logs" / "process-0.log").read_text()


def test_smoke_rerun_skips_finished_work(smoke):
    cwd, _ = smoke
    work = cwd / "runs" / "smoke"
    before = json.loads((work / "summary.json").read_text())
    r = _main(cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.loads((work / "summary.json").read_text())
    label = json.loads((work / "pseudo_labels" / "summary.json").read_text())["this_run"]
    assert label["labelled"] == 0 and label["done_before"] == 18
    assert "train step compiled" not in r.stdout  # a finished run is not trained again
    assert after["best_miou"] == before["best_miou"] and after["eval"] == before["eval"]


def test_sigkill_mid_training_then_rerun_ends_with_the_smoke_runs_state(smoke):
    """The smoke run's training again in another work directory (its data and pseudo labels, the same 2 devices),
    killed with SIGKILL after a checkpoint past step 4 and rerun: the smoke run's final parameters, BatchNorm
    statistics, optimiser state and step, bit for bit; the metrics log holds each step once."""
    cwd, _ = smoke
    killed = cwd / "runs" / "killed"
    ckpts = killed / "checkpoints"
    args = [sys.executable, "-m", "zsp_jax.main", "--config.stages=train", f"--config.workdir={killed}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps_at_kill = kill_after_checkpoint(p, ckpts, step=4)
    assert not (killed / "train_summary.json").exists()
    total = json.loads((cwd / "runs" / "smoke" / "train_summary.json").read_text())["steps"]
    assert 4 <= max(steps_at_kill) < total
    r = _main(cwd, "--config.stages=train", f"--config.workdir={killed}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming at step" in r.stdout + r.stderr
    a, b = final_state(cwd / "runs" / "smoke"), final_state(killed)
    assert a.keys() == b.keys() and len(a) > 50 and any("opt_state" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # bit-exact on CPU
    steps = [json.loads(line)["step"] for line in (killed / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total


def test_input_problems_are_reported_together(tmp_path):
    r = _main(tmp_path, "--config", os.path.join(ROOT, "configs", "voc.py"), f"--config.workdir={tmp_path / 'w'}",
              "--config.model.pretrained=weights/none.pth")
    assert r.returncode == 2
    err = r.stderr
    assert "problem(s) with the run's inputs" in err
    for what in ("data.root=", "label.sam_checkpoint", "label.clip_checkpoint", "model.pretrained",
                 "VOCtrainval_11-May-2012.tar", "sam_vit_h_4b8939.pth", "ViT-B-16.pt"):
        assert what in err, what


def test_voc_config_with_pytorch_checkpoints(tmp_path):
    """configs/voc.py on a generated VOC-layout dataset, with random SAM / open_clip / backbone files in the
    PyTorch formats: converted in the convert stage, then labelled, trained and evaluated."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for cmd in ([sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), "--root", str(tmp_path / "VOC2012"),
                 "--num-train", "24", "--min-size", "96", "--max-size", "160", "--splits", "1_4"],
                [sys.executable, os.path.join(ROOT, "tools", "make_random_checkpoints.py"), "--out",
                 str(tmp_path / "weights")]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    w = tmp_path / "weights"
    r = _main(tmp_path, "--config", os.path.join(ROOT, "configs", "voc.py") + ":split=1_4,crop=96",
              f"--config.workdir={tmp_path / 'run'}", f"--config.data.root={tmp_path / 'VOC2012'}",
              f"--config.data.splits_dir={tmp_path / 'splits'}", f"--config.data.tfds_dir={tmp_path / 'tfds'}",
              "--config.data.workers=0", f"--config.label.sam_checkpoint={w / 'sam_tiny.pth'}",
              "--config.label.sam_variant=", "--config.label.sam_allow_custom=True",
              f"--config.label.clip_checkpoint={w / 'open_clip_tiny.bin'}", "--config.label.clip_variant=",
              "--config.label.clip_model_name=ViT-B-16-quickgelu", "--config.label.clip_size=64",
              "--config.label.gem_depth=3", "--config.label.amg.points_per_side=8",
              "--config.label.amg.pred_iou_thresh=0", "--config.label.amg.stability_score_thresh=0",
              "--config.label.bucket=160", "--config.model.backbone=tiny_resnet",
              f"--config.model.pretrained={w / 'resnet_tiny_backbone.pth'}", "--config.train.batch_size=4",
              "--config.train.max_steps=6")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["converted"]) == {"label.sam_checkpoint", "label.clip_checkpoint", "model.pretrained"}
    assert all(p.endswith(".safetensors") and os.path.isfile(p) for p in summary["converted"].values())
    assert summary["label"]["labelled_total"] == 18 and summary["train"]["steps"] == 6
    assert summary["eval"]["miou"] is not None

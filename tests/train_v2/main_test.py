"""The UniMatch V2 trainer through the main job: ``python -m zsp_jax.main --config configs/smoke.py:family=v2``
(tiny random SAM / CLIP labels -> V2 training of a tiny random DINOv2 + DPT -> evaluation of the EMA teacher's best
checkpoint), what it writes about the student and the EMA teacher, and a run killed with SIGKILL and rerun, which
ends with the smoke run's state bit for bit (parameters, EMA teacher, AdamW moments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures.kill import final_state, kill_after_checkpoint
from zsp_jax.train import checkpointing

from .conftest import REPO, subprocess_env

SMOKE = os.path.join(REPO, "configs", "smoke.py") + ":family=v2,source=folder,workers=0"


def _main(cwd, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "zsp_jax.main", "--config", SMOKE, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(1))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(cwd, completed process) of the V2 smoke run; its work directory is ``cwd / "runs" / "smoke_v2"``."""
    cwd = tmp_path_factory.mktemp("smoke_v2")
    r = _main(cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd, r


def test_v2_smoke_labels_trains_and_evaluates_the_ema_teacher(smoke):
    cwd, r = smoke
    work = cwd / "runs" / "smoke_v2"
    summary = json.loads((work / "summary.json").read_text())
    train = summary["train"]
    assert summary["stages"] == ["convert", "label", "train", "eval"] and summary["label"]["labelled_total"] == 18
    assert train["family"] == "unimatch_v2" and train["mode"] == "zsp" and train["steps"] == 16
    # both evaluated at every evaluation point (epochs 2 and 4), both bests recorded; V2's result is the EMA's best
    evals = [json.loads(line) for line in (work / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [8, 16] and all("miou" in e and "miou_ema" in e for e in evals)
    assert train["best_ema_miou"] == max(e["miou_ema"] for e in evals)
    assert train["best_miou"] == max(e["miou"] for e in evals)
    assert train["result_weights"] == "ema" and train["result_miou"] == train["best_ema_miou"]
    assert summary["best_ema_miou"] == train["best_ema_miou"] and summary["final_miou_ema"] == evals[-1]["miou_ema"]
    # the eval stage evaluated the EMA teacher of the best-EMA checkpoint, and found its mIoU again
    ev = summary["eval"]
    assert ev["weights"] == "ema" and ev["checkpoint_step"] == train["best_ema_step"]
    assert ev["miou"] == pytest.approx(train["best_ema_miou"], abs=1e-6)
    # both best checkpoints are on disk (protected), recorded in the newest checkpoint's meta
    for key in ("best_checkpoint", "best_ema_checkpoint"):
        assert train[key] and os.path.isdir(train[key])
    ckpts = checkpointing.Checkpointer(str(work / "checkpoints"), read_only=True)
    try:
        meta = ckpts.restore_latest(None, None).meta
    finally:
        ckpts.close()
    assert (meta["best_step"], meta["best_ema_step"]) == (train["best_step"], train["best_ema_step"])
    assert meta["family"] == "unimatch_v2" and meta["model"]["model.encoder"] == "tiny"
    # TensorBoard has the EMA's curve; the plot and the closing lines say it
    events = b"".join(p.read_bytes() for p in (work / "tensorboard").iterdir())
    assert b"eval/miou_ema" in events and b"eval/miou" in events and (work / "plots" / "miou.png").exists()
    assert "EMA" in r.stdout and "UniMatch V2's result" in r.stdout and "EMA teacher" in r.stdout


def test_sigkill_mid_training_then_rerun_ends_with_the_smoke_runs_state(smoke):
    """The smoke run's training again in another work directory (its data and pseudo labels), killed after a
    checkpoint past step 4 and rerun: the same final parameters, EMA teacher, AdamW state and step, bit for bit."""
    cwd, _ = smoke
    killed = cwd / "runs" / "killed"
    ckpts = killed / "checkpoints"
    args = [sys.executable, "-m", "zsp_jax.main", "--config", SMOKE, "--config.stages=train",
            f"--config.workdir={killed}"]
    p = subprocess.Popen(args, cwd=cwd, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    steps_at_kill = kill_after_checkpoint(p, ckpts, step=4)
    assert not (killed / "train_summary.json").exists()
    assert 4 <= max(steps_at_kill) < 16
    r = subprocess.run(args, cwd=cwd, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming at step" in r.stdout + r.stderr
    a, b = final_state(cwd / "runs" / "smoke_v2"), final_state(killed)
    assert a.keys() == b.keys() and any("ema_params" in k for k in a) and any("opt_state" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # bit-exact on CPU
    assert any(np.any(a[k] != a[k.replace("ema_params", "params")]) for k in a if "ema_params" in k)
    steps = [json.loads(line)["step"] for line in (killed / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_resuming_with_another_model_is_refused_before_any_checkpoint_is_read(smoke):
    cwd, _ = smoke
    from tests.train.conftest import smoke_config

    from zsp_jax.train import training

    work = cwd / "runs" / "smoke_v2"
    c = smoke_config(str(work), str(work / "data" / "VOC2012"), str(work / "data" / "splits"), split="1_4",
                     arg="family=v2,source=folder,workers=0")
    c.model.encoder = "s"
    with pytest.raises(ValueError, match=r"model\.encoder='s' \(the run used 'tiny'\)"):
        training.run(c)
    assert sorted(os.listdir(work / "checkpoints")) == sorted(os.listdir(work / "checkpoints"))
    assert not (work / "checkpoints_damaged").exists()

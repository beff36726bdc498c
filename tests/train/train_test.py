"""The training loop on generated data: steps sharded over 8 devices (parameters replicated or split
FSDP-style) equal them on 1; a run killed with SIGKILL and rerun ends with the parameters of an
uninterrupted run; a diverging run stops, names the step and the loss term, and leaves only finite
checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from .conftest import REPO, smoke_config
from zsp_jax.data import readers, splits, synthetic
from zsp_jax.data import stage as data_stage
from zsp_jax.train import checkpoint
from zsp_jax.train import config as train_config
from zsp_jax.train import stage
from zsp_jax.train import state as state_lib
from zsp_jax.train import step as step_lib


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """16 generated train images (split 1_4: 4 labelled, 12 unlabelled), 4 val, and stand-in zero-shot
    labels of the unlabelled ones (ground truth with 30% of the segments relabelled)."""
    base = tmp_path_factory.mktemp("task")
    root = synthetic.make_voc_like(str(base / "VOC2012"), num_train=16, num_val=4, size_range=(64, 96), seed=3)
    layout = readers.VocLayout(root)
    sp = str(base / "splits")
    splits.make_splits(layout, sp, ["1_4"], seed=0)
    _, unlabeled = splits.load_split(layout, sp, "1_4")
    labels = str(base / "pseudo_labels")
    synthetic.make_pseudo_labels([layout.resolve(u.name) for u in unlabeled], labels, num_classes=21,
                                 corrupt_fraction=0.3, seed=0)
    return {"root": root, "splits": sp, "labels": labels, "base": base}


def _config(task, workdir, mode, **train):
    c = smoke_config(str(workdir), task["root"], task["splits"], split="1_4",
                     pseudo_labels=task["labels"] if mode == "zsp" else "")
    c.train.mode = mode
    c.train.crop_size = 64
    c.eval.bucket = 96
    for k, v in train.items():
        c.train[k] = v
    return c


def test_two_steps_on_eight_devices_equal_one_device_replicated_or_fsdp(task, tmp_path):
    # zsp: the pseudo labels of the unlabelled and mix images, CutMix, both train-mode forwards (BatchNorm
    # over the whole batch), the feature perturbation. Its targets have no confidence threshold, which would
    # flip pixels whose confidence differs by rounding between the two reduction orders.
    assert jax.device_count() == 8
    c = _config(task, tmp_path, "zsp", batch_size=8, enhanced="fixed")
    srcs = data_stage.training_sources(c, pseudo_labels=c.data.pseudo_labels)
    host = next(iter(data_stage.make_train_pipeline(c, srcs, with_unlabeled=True)))
    options = train_config.step_options(c)
    results = []
    for n, fsdp in ((1, 1), (8, 1), (8, 2)):
        c.train.num_devices, c.train.fsdp = n, fsdp
        setup = stage.setup_model(c, str(tmp_path))
        tx, schedule = state_lib.make_optimizer(c, setup.params, 100)
        host_state = state_lib.init_state(setup.params, setup.batch_stats, tx)
        mesh = setup.placement.mesh
        shardings = state_lib.state_shardings(host_state, mesh)
        state = state_lib.place(host_state, shardings)
        batch = state_lib.global_batch(host, setup.placement.batch)
        assert len(batch["labeled"]["image"].sharding.device_set) == n
        if fsdp > 1:  # parameters (and their momentum) split over the fsdp axis
            largest = max(jax.tree.leaves(state.params), key=lambda x: x.size)
            assert largest.addressable_shards[0].data.size * fsdp == largest.size
        step = jax.jit(step_lib.make_train_step(setup.graphdef, tx, options, schedule), donate_argnums=(0,),
                       out_shardings=(shardings, NamedSharding(mesh, P())))
        rng = jax.random.key(0)
        for _ in range(2):  # the second step sees momentum and updated statistics
            state, metrics = step(state, batch, rng)
        results.append((jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, (state.params, state.batch_stats))))
    (m1, s1), *sharded = results
    assert m1["finite"] == 1 and min(m1[k] for k in step_lib.LOSS_TERMS) > 0
    for m8, s8 in sharded:
        for k in step_lib.LOSS_TERMS + ("mask_ratio", "grad_norm"):
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
        leaves1, leaves8 = jax.tree.leaves(s1), jax.tree.leaves(s8)
        assert len(leaves1) == len(leaves8) > 50
        for a, b in zip(leaves1, leaves8):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _main_cmd(data, workdir):
    """The smoke config (its generated dataset in ``data``, written by the first run), training only."""
    return [sys.executable, "-m", "zsp_jax.main", "--config", "configs/smoke.py:source=folder,workers=0,mode=unimatch",
            "--config.stages=train", f"--config.workdir={workdir}", f"--config.data.root={data}/VOC2012",
            f"--config.data.splits_dir={data}/splits", "--config.synthetic.checkpoints=", "--config.train.crop_size=64",
            "--config.train.epochs=8", "--config.train.num_devices=1", "--config.checkpoint.every_steps=2",
            "--config.eval.every_epochs=0", "--config.eval.at_end=False", "--config.train.matmul_precision=highest"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _final_params(workdir) -> dict[str, np.ndarray]:
    with open(os.path.join(workdir, "train_summary.json")) as f:
        latest = json.load(f)["latest_checkpoint"]
    tree = checkpoint.read_state_arrays(latest)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sigkill_mid_training_then_rerun_ends_with_the_uninterrupted_parameters(tmp_path):
    data, whole = tmp_path / "data", tmp_path / "whole"
    r = subprocess.run(_main_cmd(data, whole), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    p = subprocess.Popen(_main_cmd(data, killed), cwd=REPO, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # Kill once a checkpoint past step 2 is complete (Orbax renames a finished one to its step number).
    while time.time() < deadline and p.poll() is None:
        if ckpts.is_dir() and any(d.isdigit() and int(d) >= 4 for d in os.listdir(ckpts)):
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL and not (killed / "train_summary.json").exists()
    steps_at_kill = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    total = json.loads((whole / "train_summary.json").read_text())["steps"]
    assert 4 <= max(steps_at_kill) < total
    r = subprocess.run(_main_cmd(data, killed), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step" in r.stdout + r.stderr
    a, b = _final_params(whole), _final_params(killed)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # bit-exact on CPU
    # The resumed run's log holds each step once.
    steps = [json.loads(line)["step"] for line in (killed / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total


def test_divergence_stops_naming_the_step_and_term_and_keeps_finite_checkpoints(task, tmp_path):
    c = _config(task, tmp_path, "supervised", lr=1e30, max_steps=12, num_devices=1)
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    c.eval.every_epochs, c.eval.at_end = 0, False
    with pytest.raises(stage.TrainingDiverged) as info:
        stage.run(c)
    e = info.value
    assert 1 <= e.step <= 12 and e.term in step_lib.LOSS_TERMS + ("grad_norm",) and not np.isfinite(e.value)
    assert f"step {e.step}" in str(e) and e.term in str(e)
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and all(s < e.step for s in saved)  # step 1 is still finite: its checkpoint is kept
    if saved:
        assert e.last_checkpoint == str(tmp_path / "checkpoints" / str(saved[-1]))
        tree = checkpoint.read_state_arrays(e.last_checkpoint)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree["params"]))

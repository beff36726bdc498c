"""Two processes (jax.distributed over loopback, CPU devices, gloo collectives) run the smoke pipeline, are
killed mid-training, are relaunched, and finish with what one uninterrupted process on the same 2-device
mesh gives (the shared smoke run): the same pseudo labels, the same trained parameters, the same mIoU.
One test covers both properties (distributed = single process, and resume across processes) because each
2-process run of the pipeline costs about two minutes of the CI budget."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import ROOT


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "zsp_jax.main", f"--config.workdir={workdir}",
            f"--config.data.root={workdir}/data/VOC2012", f"--config.data.splits_dir={workdir}/data/splits",
            f"--config.data.tfds_dir={workdir}/data/tfds", f"--config.label.sam_checkpoint={workdir}/weights/sam_tiny.safetensors",
            f"--config.label.clip_checkpoint={workdir}/weights/clip_tiny.safetensors",
            f"--config.synthetic.checkpoints={workdir}/weights",
            f"--config.data.pseudo_labels={workdir}/pseudo_labels/labels", *extra]


def _launch(workdir, n, *extra):
    port = _port()
    return [subprocess.Popen(_cmd(workdir, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                  f"--config.distributed.num_processes={n}", f"--config.distributed.process_id={i}",
                                  *extra),
                             cwd=ROOT, env=_env(2 // n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(n)]


def _wait(procs, timeout=900):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out[-2000:], err[-4000:])
    return outs


def _labels(workdir):
    found = {}
    root = os.path.join(workdir, "pseudo_labels", "labels")
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                found[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return found


def _params(workdir):
    import jax

    from zsp_jax.train.checkpointing import read_state_arrays

    with open(os.path.join(workdir, "train_summary.json")) as f:
        latest = json.load(f)["latest_checkpoint"]
    tree = read_state_arrays(latest)  # saved by 1 or 2 processes, read on this one
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
            if "params" in jax.tree_util.keystr(p) or "batch_stats" in jax.tree_util.keystr(p)}


@pytest.fixture(scope="module")
def one_process(smoke):
    """The work directory of the shared smoke run: its paths are the ones ``_cmd`` passes, under it."""
    cwd, _ = smoke
    return cwd / "runs" / "smoke"


def _same_results(a, b):
    assert _labels(a) == _labels(b) and len(_labels(a)) == 18  # bit-identical pseudo labels
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and len(pa) > 50
    for k in pa:  # the same devices in 1 or 2 processes: the same programs, bit for bit
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sb["processes"] == 2 and sa["processes"] == 1
    assert sa["eval"]["miou"] == pytest.approx(sb["eval"]["miou"], abs=1e-4)
    assert sa["best_miou"] == pytest.approx(sb["best_miou"], abs=1e-4)


def test_two_processes_killed_mid_training_resume_equal_one(one_process, tmp_path):
    procs = _launch(tmp_path, 2)
    metrics = tmp_path / "train_metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # training is under way
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert not (tmp_path / "summary.json").exists()  # it did not finish
    _wait(_launch(tmp_path, 2))
    _same_results(one_process, tmp_path)

"""The README's run command, run once for the whole e2e package: ``python -m zsp_jax.main`` (configs/smoke.py,
the embedded default) from a directory outside the repository, on 2 CPU devices.

main_test checks what it prints and writes; multiprocess_test compares two processes (1 device each, the
same 2-device mesh) against it. Under pytest-xdist the two files may run in different workers: the first
to ask runs it under a file lock in the session's shared temporary directory, the other waits and reads it.
"""

import json
import os
import subprocess
import sys

import pytest
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(cwd, *args, devices: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m zsp_jax.main *args`` in ``cwd`` with ``devices`` simulated CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "zsp_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """(cwd, completed process) of the smoke run; its work directory is ``cwd / "runs" / "smoke"``."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # common to all workers of this session
    cwd, record = shared / "smoke_run", shared / "smoke_run.json"
    with FileLock(str(shared / "smoke_run.lock")):
        if not record.exists():
            cwd.mkdir()
            r = run_main(cwd)
            record.write_text(json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
                                          "stderr": r.stderr}))
    r = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd, r

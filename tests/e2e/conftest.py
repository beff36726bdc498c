"""The README's run command, run once for the whole e2e package: ``python -m zsp_jax.main`` (configs/smoke.py,
the embedded default) from a directory outside the repository, on 2 CPU devices.

main_test checks what it prints and writes; multiprocess_test compares two processes (1 device each, the
same 2-device mesh) against it.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(cwd, *args, devices: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m zsp_jax.main *args`` in ``cwd`` with ``devices`` simulated CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "zsp_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """(cwd, completed process) of the smoke run; its work directory is ``cwd / "runs" / "smoke"``."""
    cwd = tmp_path_factory.mktemp("smoke")
    r = run_main(cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd, r

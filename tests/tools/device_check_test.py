"""``tools/device_check.py``: its tiny mode run as a user would (a subprocess on one CPU device) writes both
files with every section measured, a failing row is recorded and the others go on, and a mistake in the flags
is one ``error:`` line with exit code 2 before any work."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "device_check.py")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # One CPU device (the suite declares 8): the check measures one device anyway. The suite's persistent
    # compilation cache (tests/conftest.py) is inherited, so a rerun loads the programs instead of compiling.
    # XLA's backend at -O0: the tiny mode's time is its compiles, and its figures are not the test's subject.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    env.pop("ZSP_JAX_TRACEBACK", None)
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    r = _run(f"--out={out}")  # --tiny is the default on a CPU
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out, r


@pytest.mark.slow
def test_tiny_check_writes_both_files_with_every_section_measured(tiny_run):
    out, r = tiny_run
    tool = runpy.run_path(TOOL)
    report = json.loads((out / "device_check.json").read_text())
    page = (out / "device_check.md").read_text()
    assert report["mode"].startswith("tiny") and report["backend"] == "cpu" and report["jax"] and report["date"]
    assert list(report["sections"]) == list(tool["SECTIONS"])
    for name, rows in report["sections"].items():
        assert rows, name
        assert not [row for row in rows if "failed" in row], rows
        assert f"## {name}" in page
        assert f"== {name}" in r.stdout or name == "agreement"  # its rows are printed with the label and train rows
    assert "failed:" not in page
    sections = report["sections"]

    assert [row["platform"] for row in sections["devices"]] == ["cpu"]
    assert {(row["dtype"], row["precision"]) for row in sections["matmul"]} == {
        ("float32", "highest"), ("float32", "default"), ("bfloat16", "default")}
    assert all(_positive(row["tflops"]) for row in sections["matmul"])

    assert [row["dtype"] for row in sections["label"]] == ["float32", "bfloat16"]
    for row in sections["label"]:
        assert _positive(row["images_per_s"]) and _positive(row["compile_s"]) and _positive(row["xla_estimate_gib"])
        assert row["sizes"] and row["batch"] >= 1
        # The random-weight filters are off: both images keep segments (an empty label map would agree trivially).
        assert len(row["masks_kept"]) == 2 and all(k > 0 for k in row["masks_kept"]), row

    assert [(row["crop"], row["dtype"]) for row in sections["train"]] == [(65, "float32"), (65, "bfloat16")]
    for row in sections["train"]:
        assert _positive(row["steps_per_s"]) and _positive(row["images_per_s"]) and _positive(row["first_loss"])
        assert _positive(row["xla_estimate_gib"])

    agreement = {row["name"]: row["value"] for row in sections["agreement"]}
    assert set(agreement) == {"labeller tiny", "train step tiny_resnet crop 65"}
    assert 0.0 <= agreement["labeller tiny"] <= 1.0
    # Same weights and batch: bf16 compute moves the mean loss by far less than its own rounding of one value.
    assert math.isfinite(agreement["train step tiny_resnet crop 65"])
    assert 0.0 <= agreement["train step tiny_resnet crop 65"] < 0.05

    memory = sections["memory"]
    assert len(memory) == 4  # two train steps, two labeller programs
    for row in memory:
        assert _positive(row["xla_estimate_gib"])
        assert row["peak_gib"] is None or _positive(row["peak_gib"])  # the CPU reports no memory statistics
    assert "tiny (tiny models" in page and "| not reported |" in page


def test_a_failing_row_is_recorded_and_the_next_rows_go_on(capsys):
    tool = runpy.run_path(TOOL)
    report = tool["Report"](("train", "agreement"))

    def out_of_memory():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.\nmore detail")

    assert report.attempt("train", "big", out_of_memory) is None
    assert report.attempt("train", "small", lambda: {"steps_per_s": 2.0}) == {"name": "small", "steps_per_s": 2.0}
    report.header = {"device": "d", "date": "today", "jax": "j", "jaxlib": "j", "backend": "cpu", "machine": "m",
                     "mode": "tiny"}
    assert report.sections["train"][0] == {
        "name": "big", "failed": "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB."}
    page = report.to_markdown()
    assert "| big | failed: RuntimeError: RESOURCE_EXHAUSTED: Out of memory" in page
    assert "| small | 2.00 |" in page and "more detail" not in page
    assert "## agreement\n\n(nothing measured)" in page
    assert "big: failed: RuntimeError" in capsys.readouterr().out


@pytest.mark.parametrize("args, culprit", [
    (lambda tmp: [f"--out={tmp / 'a_file'}"], "--out="),
    (lambda tmp: [f"--out={tmp}", "--sections=matmul,gpus"], "--sections"),
    (lambda tmp: [f"--out={tmp}", "--tiny", "--full"], "--full"),
], ids=["out is a file", "unknown section", "tiny and full"])
def test_a_mistake_is_one_error_line_with_exit_code_2_and_no_work(tmp_path, args, culprit):
    (tmp_path / "a_file").write_text("not a folder")
    r = _run(*args(tmp_path), timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert len(errors) == 1 and culprit in errors[0], errors
    assert "Traceback" not in r.stdout + r.stderr
    assert "==" not in r.stdout  # no section started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written

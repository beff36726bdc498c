"""zsp_jax.utils.bench helpers that tools rely on for what they print."""

import subprocess
import sys

import numpy as np

from zsp_jax.utils import bench


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """A tool started from a large process (here: this one, after touching 1 GiB more) reports its own peak.

    ``ru_maxrss`` survives ``execve`` on Linux, which once made convert_sam.py report the test
    runner's memory as its own.
    """
    big = np.ones(2**28, np.float32)  # 1 GiB, touched
    assert bench.peak_rss_bytes() > 1.05 * 2**30
    child = subprocess.run([sys.executable, "-c", "from zsp_jax.utils.bench import peak_rss_bytes; "
                            "import numpy as np; a = np.ones(2**27, np.float32); print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    peak = int(child.stdout.strip())
    del big
    assert 0.5 * 2**30 <= peak < 1.0 * 2**30, peak / 2**30  # its own 0.5 GiB array + the runtime


def test_alternating_timer_takes_turns_and_keeps_each_minimum(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])  # a clock that only the calls advance
    calls, durations = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([2.0, 4.0, 1.5])}

    def make(name):
        def fn():
            calls.append(name)
            now[0] += next(durations[name])
        return fn

    assert bench.time_alternating([make("a"), make("b")], repeats=3) == [1.0, 1.5]
    assert calls == ["a", "b"] * 3

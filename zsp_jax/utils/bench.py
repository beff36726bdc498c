"""Shared helpers for the ``tools/bench_*.py`` scripts: timing, FLOP counts, machine rates.

Every benchmark reports (a) wall time of ours and of the PyTorch reference on the same
weights and inputs, (b) their ratio, and (c) our achieved FLOP/s against the machine's
*measured* dense matmul rate, so that a figure says how close to the hardware we are and
not only how we compare with the reference.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def block(x: Any) -> Any:
    """Waits for every jax array in ``x`` (no-op for numpy / torch outputs)."""
    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> float:
    """Minimum wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    The minimum is the least noisy estimate on a shared machine; outputs are blocked on so
    that asynchronous dispatch is not mistaken for speed.
    """
    for _ in range(warmup):
        block(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def time_alternating(fns: Sequence[Callable[[], Any]], *, repeats: int = 3) -> list[float]:
    """Minimum wall time in seconds of each ``fn()`` over ``repeats`` rounds, the functions taking turns
    within each round (no warm-up: warm them first).

    For long calls on a shared machine whose speed drifts over minutes: each side sees the same
    stretches of the machine's time, so their ratio is fairer than from two blocks run one after the other.
    """
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            block(fn())
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def program_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled program (``jax.jit(f).lower(...).compile()``) by XLA's cost
    analysis; None where the backend gives no estimate."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_flops(jitted: Any, *args: Any, **kwargs: Any) -> float | None:
    """``program_flops`` of ``jitted`` (a ``jax.jit``-wrapped function) compiled for these arguments."""
    return program_flops(jitted.lower(*args, **kwargs).compile())


def memory_summary(compiled: Any) -> str:
    """XLA's memory estimate of a compiled program, per device, with its parts (maxtext's print): the total of
    ``zsp_jax.utils.memory.estimated_bytes`` (arguments + outputs + temporaries - donated buffers)."""
    from zsp_jax.utils.memory import GIB, estimated_bytes

    total = estimated_bytes(compiled)
    if total is None:
        return "memory estimate unavailable"
    parts = compiled.memory_analysis()
    return (f"{total / GIB:.2f} GiB per device (arguments {parts.argument_size_in_bytes / GIB:.2f}, outputs "
            f"{parts.output_size_in_bytes / GIB:.2f}, temporaries {parts.temp_size_in_bytes / GIB:.2f}, donated "
            f"{parts.alias_size_in_bytes / GIB:.2f})")


def matmul_rate(dtype: Any = jnp.float32, n: int = 2048, device: Any = None) -> float:
    """Measured dense matmul FLOP/s of JAX on ``device`` (default: the first device)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    t = time_fn(lambda: f(a, a), warmup=2, repeats=5)
    return 2 * n**3 / t


def torch_matmul_rate(n: int = 2048) -> float:
    """Measured fp32 matmul FLOP/s of torch on the CPU with its current thread count."""
    import torch

    a = torch.ones(n, n)
    t = time_fn(lambda: a @ a, warmup=2, repeats=5)
    return 2 * n**3 / t


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    Reads ``VmHWM`` from ``/proc/self/status`` where it exists: ``getrusage``'s ``ru_maxrss``
    survives ``execve``, so a tool started from a large process (a test run, a notebook) would
    report its parent's peak instead of its own. Falls back to ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib_or_bytes if platform.system() == "Darwin" else kib_or_bytes * 1024


def machine_description() -> str:
    """One line naming the machine, for the docs/benchmarks.md tables."""
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    kind = dev.device_kind if dev.platform != "cpu" else "CPU"
    return (f"{kind} x{jax.device_count()} ({dev.platform}), host {cpu}, {os.cpu_count()} cores, "
            f"jax {jax.__version__}")


PRECISIONS = ("highest", "high", "default")


def add_precision_flag(parser: Any) -> None:
    """``--matmul-precision`` on a benchmark's argparse parser (default: highest, fp32 parity)."""
    parser.add_argument("--matmul-precision", choices=PRECISIONS, default="highest",
                        help="jax_default_matmul_precision for our side (GPUs/TPUs default to reduced fp32 "
                             "precision; 'highest' is what fp32 parity needs)")


def set_matmul_precision(value: str) -> str:
    """Sets ``jax_default_matmul_precision`` for the process and returns a line saying so."""
    jax.config.update("jax_default_matmul_precision", value)
    return f"   matmul precision (jax_default_matmul_precision): {value}"


@dataclasses.dataclass
class Comparison:
    """One benchmark row: ours against the reference on the same work."""

    name: str
    ours_s: float
    reference_s: float | None = None
    flops: float | None = None
    peak_flops: float | None = None
    unit_count: float = 1.0
    unit: str = "call"

    def line(self) -> str:
        parts = [f"{self.name}: ours {self.ours_s * 1e3:9.1f} ms/{self.unit}"
                 f" ({self.unit_count / self.ours_s:8.2f} {self.unit}/s)"]
        if self.reference_s is not None:
            parts.append(f"reference {self.reference_s * 1e3:9.1f} ms/{self.unit}"
                         f"  speed-up x{self.reference_s / self.ours_s:5.2f}")
        if self.flops:
            achieved = self.flops / self.ours_s
            s = f"{achieved / 1e9:8.1f} GFLOP/s"
            if self.peak_flops:
                s += f" = {100 * achieved / self.peak_flops:5.1f}% of measured matmul rate"
            parts.append(s)
        return " | ".join(parts)


def print_header(title: str, peak: float | None = None) -> None:
    print(f"== {title}")
    print(f"   machine: {machine_description()}")
    if peak:
        print(f"   measured JAX fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s")


def set_torch_threads() -> int:
    """Gives torch the same cores XLA uses, so the comparison is like for like."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def relative_error(ours: Any, ref: Any) -> float:
    """max|a-b| / max|b|: the parity measure used across the test-suite and benchmarks."""
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

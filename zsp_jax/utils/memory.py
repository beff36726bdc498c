"""How much device memory a compiled program may use, and how much XLA estimates it uses.

``MemoryBudget`` is the labeller's and mask generator's limit when they choose their ``auto`` sizes
(``zsp_jax.amg.programs``) and the trainer's yardstick when it says whether its step fits
(``zsp_jax.train.loop``). The device's own ``bytes_limit`` is used where the backend reports it (GPUs,
TPUs); the CPU reports none, so the machine's physical memory, shared by its simulated devices, stands in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The bytes a program may use per device (``fraction`` of ``total``) and where ``total`` came from.

    Attributes:
      total: the device's memory in bytes.
      fraction: the share a program's XLA estimate may take.
      source: where ``total`` came from, for messages.
      field: the setting that gives the memory by hand, named in errors.
    """

    total: int
    fraction: float
    source: str
    field: str

    @property
    def limit(self) -> int:
        return int(self.total * self.fraction)

    @classmethod
    def of_device(cls, device: Any, *, memory_gb: float = 0.0, fraction: float = 0.8,
                  field: str = "label.device_memory_gb", local_devices: int | None = None) -> "MemoryBudget":
        """The budget of ``device``: ``memory_gb`` when > 0, else the device's own ``bytes_limit``, else (a CPU)
        the machine's physical memory divided among its ``local_devices`` (default: the local devices of that
        platform; simulated CPU devices share one memory)."""
        if memory_gb > 0:
            return cls(int(memory_gb * GIB), fraction, f"{field}={memory_gb:g}", field)
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory statistics (the CPU) raise or return None
            stats = {}
        if stats.get("bytes_limit"):
            return cls(int(stats["bytes_limit"]), fraction, f"{device.device_kind} bytes_limit", field)
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = local_devices or len([d for d in jax.local_devices() if d.platform == device.platform])
        source = "physical memory" + (f" / {n} devices" if n > 1 else "")
        return cls(physical // max(n, 1), fraction, source, field)


def estimated_bytes(compiled: Any) -> int | None:
    """XLA's per-device memory estimate of a compiled program: arguments + outputs + temporaries - donated
    buffers (``zsp_jax.utils.bench.memory_summary`` prints it with its parts); None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def describe_fit(what: str, estimate: int | None, budget: MemoryBudget, advice: str) -> str:
    """One line saying whether ``what``'s XLA estimate (bytes per device) fits ``budget``, with ``advice`` (the
    fields to change) when it does not. Said before the first step, not enforced: the estimate is XLA's."""
    device = f"{budget.total / GIB:.1f} GiB ({budget.source})"
    if estimate is None:
        return f"memory: no XLA estimate for {what} on this backend; the device has {device}"
    if estimate <= budget.limit:
        return (f"memory: {what} fits, {estimate / GIB:.2f} GiB per device by XLA's estimate, "
                f"{estimate / budget.total:.0%} of {device}")
    return (f"memory: {what} may not fit: {estimate / GIB:.2f} GiB per device by XLA's estimate, above "
            f"{budget.fraction:.0%} of {device}; {advice}")

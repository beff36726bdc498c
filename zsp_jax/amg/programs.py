"""One compiled program per size bucket, for the mask generator and the labeller alike.

``BucketPrograms`` holds what both need around their traced computation:

* the set-up: the device mesh, the replicated arguments (weights, tables) placed once, the
  batch sharding (leading axis over the mesh's "data" axis);
* per bucket, the program: ahead-of-time compiled (``jax.jit(...).lower(abstract inputs).compile()``,
  which also gives XLA's memory estimate), each device mapping over its share of the batch
  ``images_per_device`` images at a time (``zsp_jax.utils.sharding.map_groups_per_device``), so
  results do not depend on the number of devices;
* automatic sizes: the throughput settings left at ``"auto"`` (``zsp_jax.amg.tuning``) are chosen
  once per bucket as the largest candidate whose memory estimate fits the device's budget
  (``MemoryBudget``); candidates are compiled largest first, each halving one setting, so the
  first that fits is the choice and the one before it is known not to fit; the chosen compile is
  the program that runs;
* compiling in the background (``prefetch``): the next bucket's program while the devices work
  on the current one;
* pad-and-dispatch: a partial batch is padded by repeating its last row.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsp_jax.amg.tuning import SizeRequest, Sizes
from zsp_jax.utils import bench
from zsp_jax.utils.memory import GIB, MemoryBudget, estimated_bytes
from zsp_jax.utils.sharding import map_groups_per_device

@dataclasses.dataclass
class Program:
    """A compiled program of one bucket.

    Attributes:
      key: the caller's static description of the bucket (hashable).
      sizes: the throughput settings it was compiled with.
      batch_size: images per call (devices x images_per_device x calls' groups).
      compiled: the executable: ``compiled(replicated, batch)``.
      memory_bytes: XLA's per-device estimate (None if unavailable).
      memory: the estimate spelled out (``zsp_jax.utils.bench.memory_summary``).
      budget: the memory budget the sizes were chosen against (None if none were automatic).
      compile_seconds: seconds of every compile made to choose and build it.
      compiles: how many programs were compiled for it (1 when the sizes were fixed or the largest fit).
    """

    key: Any
    sizes: Sizes
    batch_size: int
    compiled: Any
    memory_bytes: int | None
    memory: str
    budget: MemoryBudget | None
    compile_seconds: float
    compiles: int

    def describe(self) -> str:
        """e.g. ``"4 images x group 64 x chunk 64, 11.2 of 14.0 GiB (XLA estimate; 2 compiles, 81.0 s)"``."""
        line = self.sizes.describe()
        if self.memory_bytes is not None:
            line += f", {self.memory_bytes / GIB:.1f}"
            line += f" of {self.budget.limit / GIB:.1f} GiB" if self.budget else " GiB"
            line += " (XLA estimate"
        else:
            line += " (no memory estimate"
        return line + f"; {self.compiles} compile{'s' if self.compiles != 1 else ''}, {self.compile_seconds:.1f} s)"


class BucketPrograms:
    """Compiled programs by bucket key, with automatic sizes (see the module docstring).

    Args:
      mesh: the device mesh (one "data" axis).
      replicated: a tuple of pytrees every program takes first, replicated on every device.
      build: ``build(key, sizes) -> fn(*replicated, group)``: the computation of one group of
        ``sizes.images_per_device`` images (a pytree with that leading axis) of bucket ``key``.
      abstract_batch: ``abstract_batch(key, sizes, batch) -> pytree of jax.ShapeDtypeStruct``: the
        inputs of a call of ``batch`` images (sharding is added here).
      request: the requested sizes (ints or ``"auto"``).
      limits: what ``"auto"`` may go up to.
      budget: the memory budget automatic sizes must fit (required when any size is automatic).
      batch_size: images per call; default ``devices x images_per_device``. A multiple of it
        maps over several groups per device in one call; automatic candidates that do not divide
        it are skipped.
      matmul_precision: ``jax.default_matmul_precision`` while tracing (None: the global setting).
    """

    def __init__(self, mesh: Mesh, replicated: tuple[Any, ...], build: Callable[[Any, Sizes], Callable[..., Any]],
                 abstract_batch: Callable[[Any, Sizes, int], Any], request: SizeRequest, limits: Sizes, *,
                 budget: MemoryBudget | None = None, batch_size: int | None = None,
                 matmul_precision: str | None = None):
        self.mesh = mesh
        self.n_devices = mesh.devices.size
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.replicated = jax.device_put(replicated, NamedSharding(mesh, P()))
        self._n_replicated = len(replicated)
        self._build = build
        self._abstract_batch = abstract_batch
        self.request = request
        self.limits = limits
        self.budget = budget
        self._batch_size = batch_size
        self.matmul_precision = matmul_precision
        self._candidates = [s for s in request.candidates(limits) if self._fits_batch(s)]
        if not self._candidates:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {self.n_devices} devices x "
                             f"images_per_device of any candidate ({request})")
        self.programs: dict[Any, Program] = {}
        self._compiled: dict[tuple[Any, Sizes], tuple[Any, int | None, float]] = {}
        self._pending: dict[Any, cf.Future] = {}
        self._lock = threading.Lock()
        self._background = cf.ThreadPoolExecutor(1, thread_name_prefix="compile")

    # ------------------------------------------------------------------ sizes and compiles

    def _fits_batch(self, sizes: Sizes) -> bool:
        return self._batch_size is None or self._batch_size % (self.n_devices * sizes.images_per_device) == 0

    @property
    def max_batch_size(self) -> int:
        """The most images a call of any candidate takes."""
        return self.batch_size_of(self._candidates[0])

    def batch_size_of(self, sizes: Sizes) -> int:
        return self._batch_size or self.n_devices * sizes.images_per_device

    def compile(self, key: Any, sizes: Sizes) -> tuple[Any, int | None, float]:
        """Ahead-of-time compiles ``key``'s program at ``sizes``: (executable, XLA's bytes estimate, seconds).

        Kept until ``key``'s program is chosen, so a search after an explicit call compiles nothing twice."""
        with self._lock:
            if (key, sizes) in self._compiled:
                return self._compiled[key, sizes]
        t0 = time.perf_counter()
        fn = self._build(key, sizes)
        run = map_groups_per_device(fn, self.mesh, sizes.images_per_device, self._n_replicated)
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.batch_sharding),
                             self._abstract_batch(key, sizes, self.batch_size_of(sizes)))
        precision = (jax.default_matmul_precision(self.matmul_precision) if self.matmul_precision
                     else contextlib.nullcontext())
        with precision:
            compiled = jax.jit(lambda replicated, x: run(*replicated, x)).lower(self.replicated, batch).compile()
        result = compiled, estimated_bytes(compiled), time.perf_counter() - t0
        with self._lock:
            self._compiled[key, sizes] = result
        return result

    def _choose(self, key: Any) -> Program:
        """The program of ``key``: the first candidate whose estimate fits the budget (see the module docstring).

        Without an estimate (a backend without memory analysis) the largest candidate is taken."""
        seconds, estimates = 0.0, []
        for i, sizes in enumerate(self._candidates):
            compiled, used, dt = self.compile(key, sizes)
            seconds += dt
            estimates.append(used)
            if len(self._candidates) == 1 or used is None or used <= self.budget.limit:
                with self._lock:  # the candidates' executables are no longer needed
                    for candidate in self._candidates:
                        self._compiled.pop((key, candidate), None)
                return Program(key, sizes, self.batch_size_of(sizes), compiled, used, bench.memory_summary(compiled),
                               self.budget if len(self._candidates) > 1 else None, seconds, i + 1)
        b = self.budget
        raise ValueError(
            f"config field {b.field}: no setting fits the memory budget of {b.limit / GIB:.3g} GiB per device "
            f"({b.fraction:g} of {b.total / GIB:.3g} GiB, {b.source}); the smallest, "
            f"{self._candidates[-1].describe()}, needs {min(estimates) / GIB:.3g} GiB by XLA's estimate. Give "
            f"more memory ({b.field}), or use smaller images or fewer points per side")

    def program(self, key: Any) -> Program:
        """The program of bucket ``key`` (compiled on first use, or waited for if compiling in the background)."""
        with self._lock:
            if key in self.programs:
                return self.programs[key]
            future = self._pending.get(key)
            if future is None:
                future = cf.Future()
                self._pending[key] = future
                mine = True
            else:
                mine = False
        if mine:
            self._fulfil(key, future)
        return future.result()

    def _fulfil(self, key: Any, future: cf.Future) -> None:
        try:
            result = self._choose(key)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the program
            with self._lock:
                self._pending.pop(key, None)
            future.set_exception(e)
            return
        with self._lock:
            self.programs[key] = result
            self._pending.pop(key, None)
        future.set_result(result)

    def prefetch(self, key: Any) -> None:
        """Starts compiling ``key``'s program in a background thread unless it exists or is on its way."""
        with self._lock:
            if key in self.programs or key in self._pending:
                return
            future = cf.Future()
            self._pending[key] = future
        self._background.submit(self._fulfil, key, future)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the finished programs (background compiles included)."""
        return sum(p.compile_seconds for p in self.programs.values())

    # ------------------------------------------------------------------ running

    def run(self, program: Program, batch: Any) -> Any:
        """Starts ``program`` on a batch of up to ``program.batch_size`` images (numpy leaves with that leading
        axis); pads by repeating the last image, shards over the mesh; returns the device outputs at once."""
        n = jax.tree.leaves(batch)[0].shape[0]
        if not 0 < n <= program.batch_size:
            raise ValueError(f"expected 1..{program.batch_size} images, got {n}")
        if n < program.batch_size:
            batch = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], program.batch_size - n, axis=0)]),
                                 batch)
        return program.compiled(self.replicated, jax.device_put(batch, self.batch_sharding))

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)

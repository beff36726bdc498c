"""Data-parallel helpers shared by the mask generator and the labeller.

Both run an independent program per image group: ``shard_map`` over a 1-D "data" mesh gives
every device its slice of the batch, and ``lax.map`` walks the slice ``group`` images at a
time, so each device runs the same per-group program whatever the number of devices (results
are bitwise identical on 1 and on N devices for the same group size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh (axis "data") over ``devices`` (default: all local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices).reshape(len(devices)), ("data",))


def map_groups_per_device(fn: Callable[..., Any], mesh: Mesh, group: int, n_replicated: int) -> Callable[..., Any]:
    """``fn(*replicated, batch_group) -> outputs`` applied to every ``group`` images of every device.

    Returns ``run(*replicated, batch)``: the ``n_replicated`` leading arguments are replicated
    pytrees (weights, tables), ``batch`` a pytree whose leaves have a leading batch axis
    sharded over "data", of length ``devices * group * m``. Outputs keep the batch axis.
    """

    def per_device(*args: Any) -> Any:
        replicated, batch = args[:n_replicated], args[n_replicated]
        grouped = jax.tree.map(lambda a: a.reshape((a.shape[0] // group, group) + a.shape[1:]), batch)
        out = jax.lax.map(lambda x: fn(*replicated, x), grouped)
        return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * n_replicated + (P("data"),),
                         out_specs=P("data"), check_vma=False)


def barrier(name: str) -> None:
    """Waits for every JAX process (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

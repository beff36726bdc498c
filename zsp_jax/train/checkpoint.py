"""Orbax checkpoints of a training run (maxtext style): state, input position and run metadata together.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds three items, written by one
``ocp.CheckpointManager`` in all processes:

* ``state``: the ``TrainState`` (step, fp32 parameters, BatchNorm statistics, optimiser state)
  and the run's base ``rng`` (key data), saved asynchronously (the device-to-host copy
  blocks, the writing does not);
* ``input``: the Grain iterator position (one JSON file per process), so a resumed run reads
  exactly the batches the killed one would have read next;
* ``meta``: JSON (epoch, best mIoU and its step, the evaluation history, whether the run
  finished), read by ``zsp_jax.train.stage`` and by people.

Orbax writes into a temporary directory and renames it when complete, so a run killed while
writing resumes from the previous complete checkpoint. Kept: the last ``keep`` checkpoints and,
with ``keep_best``, the one with the best mIoU (saved with ``metrics={"miou": ...}``).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from zsp_jax.train.state import TrainState

STATE, INPUT, META = "state", "input", "meta"


def _tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": jax.random.key_data(rng)}


def abstract_tree(state: TrainState, rng: jax.Array, shardings: Any, rng_sharding: Any) -> dict[str, Any]:
    """The restore target: shapes, dtypes and shardings of ``_tree(state, rng)``."""
    tree = _tree(state, rng)
    sh = {"step": shardings.step, "params": shardings.params, "batch_stats": shardings.batch_stats,
          "opt_state": shardings.opt_state, "rng": rng_sharding}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)


class Checkpointer:
    """The run's checkpoint manager (every process must call the same methods in the same order).

    Args:
      directory: ``<workdir>/checkpoints``.
      keep: how many of the latest checkpoints to keep (>= 1).
      keep_best: also keep the checkpoint with the highest ``miou`` metric.
      async_save: write in the background (the next save, or ``wait``, waits for it).
    """

    def __init__(self, directory: str, *, keep: int = 2, keep_best: bool = True, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        policy: Any = policies.LatestN(n=keep)
        if keep_best:
            best = policies.BestN(get_metric_fn=lambda m: m["miou"], reverse=False, n=1,
                                  keep_checkpoints_without_metrics=False)
            policy = policies.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                               preservation_policy=policy, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, INPUT, META),
                                             item_handlers={STATE: ocp.StandardCheckpointHandler(),
                                                            INPUT: grain.checkpoint.CheckpointHandler(),
                                                            META: ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, rng: jax.Array, iterator: Any, meta: dict[str, Any],
             miou: float | None = None) -> None:
        """Saves everything at ``step`` (``miou``: the evaluation of this state, for keeping the best)."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_tree(state, rng)),
                                     INPUT: grain.checkpoint.CheckpointSave(iterator),
                                     META: ocp.args.JsonSave(meta)})
        self.manager.save(step, args=args, metrics=None if miou is None else {"miou": float(miou)}, force=True)

    def restore(self, step: int, abstract: dict[str, Any], iterator: Any | None) -> tuple[dict[str, Any], dict]:
        """(state tree as saved, meta) of ``step``; moves ``iterator`` (if given) to the saved position."""
        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
        if iterator is not None:
            items[INPUT] = grain.checkpoint.CheckpointRestore(iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out[STATE], out[META]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def state_from_tree(tree: dict[str, Any]) -> tuple[TrainState, jax.Array]:
    """(TrainState, rng) from a restored ``state`` item."""
    state = TrainState(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                       opt_state=tree["opt_state"])
    return state, jax.random.wrap_key_data(tree["rng"])


def restore_params(directory: str, step: int | None, abstract_params: Any, abstract_stats: Any
                   ) -> tuple[Any, Any, int]:
    """(params, batch_stats, step) of a run's checkpoint (latest if ``step`` is None), without the
    optimiser state or the input position (evaluation)."""
    mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE, INPUT, META),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    target = {"params": abstract_params, "batch_stats": abstract_stats}
    restored = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target),
        partial_restore=True)}))[STATE]
    mngr.close()
    return restored["params"], restored["batch_stats"], step


def read_state_arrays(checkpoint: str) -> dict[str, Any]:
    """The ``state`` item of ``<run>/checkpoints/<step>`` as numpy arrays on this host, whatever the
    devices and processes that saved it (for inspection and comparisons; training restores with
    ``Checkpointer.restore``). Keys: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``rng``."""
    path = os.path.join(os.path.abspath(checkpoint), STATE)
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))

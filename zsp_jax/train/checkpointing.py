"""Orbax checkpoints of a training run (maxtext style): state, input position and run metadata together.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds three items, written by one
``ocp.CheckpointManager`` in all processes:

* ``state``: the ``TrainState`` (step, fp32 parameters, BatchNorm statistics, optimiser state; for
  ``unimatch_v2`` the ``TrainStateV2``: step, parameters, the EMA teacher's parameters, AdamW state)
  and the run's base ``rng`` (key data), saved asynchronously (the device-to-host copy
  blocks, the writing does not);
* ``input``: the Grain iterator position (one JSON file per process), so a resumed run reads
  exactly the batches the killed one would have read next;
* ``meta``: JSON (epoch, the best mIoU and its step, the evaluation history, whether the run
  finished, the schedule it was started with), read by the loop and by people.

Orbax writes into a temporary directory and renames it when complete, so a run killed while
writing resumes from the previous complete checkpoint.

What is kept: the last ``keep`` checkpoints and every *protected* step (the best checkpoint by
mIoU; for ``unimatch_v2`` the student's best and the EMA teacher's best). The best step is part of each checkpoint's ``meta``, so it is on disk with the checkpoint
that records it, atomically, and a new process after any number of kills knows it (Orbax's own
``BestN`` keeps its metrics in memory and forgot the best after a restart).

Damaged checkpoints: ``restore_latest`` tries the newest step; one that fails to restore (a
truncated array file, unreadable metadata, a missing item) is moved aside to
``<workdir>/checkpoints_damaged/<step>-<date>-<time>`` (never deleted) with one line saying why, and the
previous step is tried, until one restores; if none does, ``CheckpointsDamaged`` lists what was
tried. A second step that fails for the same reason as the one before is left where it is: two
checkpoints failing alike point at what reads them (another JAX, Orbax or Grain version, another
process count) more than at the files, and moving every checkpoint of a run aside would leave the
user to move them all back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from zsp_jax.train.state import TrainState
from zsp_jax.train.v2_state import TrainStateV2
from zsp_jax.utils.sharding import barrier

STATE, INPUT, META = "state", "input", "meta"
DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/, so that Orbax never lists what is moved there


class CheckpointsDamaged(RuntimeError):
    """No checkpoint of a run could be restored; ``tried`` holds (path, reason) of each one, ``moved`` the
    paths moved to ``checkpoints_damaged/``, ``same_failure`` whether the search stopped at a step that
    failed like the one before (left in place: module docstring)."""

    def __init__(self, directory: str, tried: list[tuple[str, str]], moved: Sequence[str] = (),
                 same_failure: bool = False):
        listed = "; ".join(f"{path}: {reason}" for path, reason in tried)
        where = (f"{len(moved)} moved to {os.path.join(os.path.dirname(directory), DAMAGED_DIR)}" if moved
                 else "none moved")
        why = (f"; {tried[-1][0]} failed like the one before and was left in place (the same failure twice "
               f"suggests that this software or process count cannot read the run, rather than damaged files)"
               if same_failure else "")
        super().__init__(f"no checkpoint in {directory} could be restored ({where}): {listed}{why}. Resume with "
                         f"the software and process count that wrote them, start again with another "
                         f"config.workdir, or restore a copy of the checkpoints")
        self.tried = tried
        self.moved = list(moved)
        self.same_failure = same_failure


def short_reason(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (for one-line reports)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same_failure(reason: str, previous: str) -> bool:
    """Whether two steps' failure reasons are the same once their step numbers and paths are set aside."""
    def general(text: str) -> str:
        return re.sub(r"\d+", "#", text)

    return general(reason) == general(previous)


def _fields(state: Any) -> dict[str, Any]:
    """The fields of a ``TrainState`` / ``TrainStateV2`` (or of a tree of their shardings) as a dict."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _tree(state: TrainState | TrainStateV2, rng: jax.Array) -> dict[str, Any]:
    return {**_fields(state), "rng": jax.random.key_data(rng)}


def abstract_tree(state: TrainState | TrainStateV2, rng: jax.Array, shardings: Any, rng_sharding: Any
                  ) -> dict[str, Any]:
    """The restore target: shapes, dtypes and shardings of ``_tree(state, rng)``."""
    tree = _tree(state, rng)
    sh = {**_fields(shardings), "rng": rng_sharding}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)


@dataclasses.dataclass
class _KeepProtected(policies.PreservationPolicy):
    """Keeps the checkpoints whose step ``protected()`` returns (the best one)."""

    protected: Callable[[], set[int]]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        keep = self.protected()
        return [info.step in keep for info in checkpoints]


@dataclasses.dataclass
class Restored:
    """What ``restore_latest`` found: the step, the state tree as saved and the run's meta."""

    step: int
    tree: dict[str, Any] | None
    meta: dict[str, Any]


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds in every process (a restore that fails in one process fails for all)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpointer:
    """The run's checkpoint manager (every process must call the same methods in the same order).

    Args:
      directory: ``<workdir>/checkpoints``.
      keep: how many of the latest checkpoints to keep (>= 1); protected steps are kept besides.
      async_save: write in the background (the next save, or ``wait``, waits for it).
      read_only: never write, delete or move anything (evaluation of a run).
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.keep, self.async_save, self.read_only = keep, async_save, read_only
        self._protected: set[int] = set()
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        if self.read_only:
            options = ocp.CheckpointManagerOptions(read_only=True)
        else:
            policy = policies.AnyPreservationPolicy([policies.LatestN(n=self.keep),
                                                     _KeepProtected(lambda: set(self._protected))])
            options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=self.async_save,
                                                   preservation_policy=policy, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, INPUT, META),
                                     item_handlers={STATE: ocp.StandardCheckpointHandler(),
                                                    INPUT: grain.checkpoint.CheckpointHandler(),
                                                    META: ocp.JsonCheckpointHandler()})

    def protect(self, steps: set[int]) -> None:
        """The steps (besides the last ``keep``) that no later save may delete: the best checkpoint(s)."""
        self._protected = {int(s) for s in steps if s is not None}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState | TrainStateV2, rng: jax.Array, iterator: Any, meta: dict[str, Any]) -> None:
        """Saves everything at ``step``; ``meta`` records the best step(s), protected from then on."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_tree(state, rng)),
                                     INPUT: grain.checkpoint.CheckpointSave(iterator),
                                     META: ocp.args.JsonSave(meta)})
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract: dict[str, Any] | None, iterator: Any | None
                ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(state tree as saved, meta) of ``step`` (only meta when ``abstract`` is None); moves
        ``iterator`` (if given) to the saved position."""
        items: dict[str, Any] = {META: ocp.args.JsonRestore()}
        if abstract is not None:
            items[STATE] = ocp.args.StandardRestore(abstract)
        if iterator is not None:
            items[INPUT] = grain.checkpoint.CheckpointRestore(iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = out[META]
        if not isinstance(meta, dict):
            raise ValueError(f"meta item is {type(meta).__name__}, not a JSON object")
        return (out[STATE] if abstract is not None else None), meta

    def restore_latest(self, abstract: dict[str, Any] | None, iterator: Any | None, *,
                       say: Callable[[str], None] = print) -> Restored | None:
        """The newest checkpoint that restores (None if there is none).

        A step that fails is moved aside to ``<workdir>/checkpoints_damaged/`` (unless read-only:
        then it is only skipped) with one line through ``say``, and the previous step is tried.
        Raises ``CheckpointsDamaged`` when checkpoints exist and none restores, or when a step fails for the
        same reason as the one before it (that one is left in place: module docstring).
        """
        tried: list[tuple[str, str]] = []
        moved: list[str] = []
        while True:
            steps = self.all_steps()
            candidates = [s for s in reversed(steps) if self.path(s) not in {p for p, _ in tried}]
            if not candidates:
                break
            step = candidates[0]
            try:
                tree, meta = self.restore(step, abstract, iterator)
                ok, reason = True, ""
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means it is damaged
                tree, meta, ok, reason = None, {}, False, short_reason(e)
            if _all_processes_agree(ok):
                return Restored(step, tree, meta)
            reason = reason or "failed to restore in another process"
            if _all_processes_agree(bool(tried) and _same_failure(reason, tried[-1][1])):
                tried.append((self.path(step), reason))
                raise CheckpointsDamaged(self.directory, tried, moved, same_failure=True)
            tried.append((self.path(step), reason))
            if self.read_only:
                say(f"checkpoint {self.path(step)} cannot be read ({reason}); using the previous one")
                continue
            moved.append(self._move_aside(step))
            say(f"checkpoint step {step} could not be restored ({reason}); moved to {moved[-1]}, "
                f"resuming from the previous checkpoint")
        if tried:
            raise CheckpointsDamaged(self.directory, tried, moved)
        return None

    def _move_aside(self, step: int) -> str:
        """Moves ``<step>`` to ``<workdir>/checkpoints_damaged/`` (process 0) and reopens the manager."""
        target_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(target_dir, exist_ok=True)
            while os.path.exists(target):
                target += "+"
            os.rename(self.path(step), target)
        barrier(f"zsp_checkpoint_moved_{step}")
        self.manager.close()
        self.manager = self._open()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def state_from_tree(tree: dict[str, Any]) -> tuple[TrainState | TrainStateV2, jax.Array]:
    """(TrainState or TrainStateV2, rng) from a restored ``state`` item (V2's holds ``ema_params``)."""
    cls = TrainStateV2 if "ema_params" in tree else TrainState
    state = cls(**{f.name: tree[f.name] for f in dataclasses.fields(cls)})
    return state, jax.random.wrap_key_data(tree["rng"])


def restore_items(directory: str, step: int, target: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``target`` (abstract arrays with shardings, e.g. ``{"ema_params": ...}``) from the state of
    a run's checkpoint ``step``, and nothing else (no optimiser state, no input position: evaluation)."""
    mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=(STATE, INPUT, META),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target),
            partial_restore=True)}))[STATE]
    finally:
        mngr.close()
    return {k: restored[k] for k in target}


def restore_params(directory: str, step: int, abstract_params: Any, abstract_stats: Any) -> tuple[Any, Any]:
    """(params, batch_stats) of a run's checkpoint ``step``, without the optimiser state or the input
    position (evaluation)."""
    restored = restore_items(directory, step, {"params": abstract_params, "batch_stats": abstract_stats})
    return restored["params"], restored["batch_stats"]


def read_state_arrays(checkpoint: str) -> dict[str, Any]:
    """The ``state`` item of ``<run>/checkpoints/<step>`` as numpy arrays on this host, whatever the
    devices and processes that saved it (for inspection and comparisons; training restores with
    ``Checkpointer.restore``). Keys: ``step``, ``params``, ``batch_stats`` (V2: ``ema_params``), ``opt_state``,
    ``rng``."""
    path = os.path.join(os.path.abspath(checkpoint), STATE)
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))

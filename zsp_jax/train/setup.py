"""What a training, evaluation or relabelling run builds from the config before its first step.

* ``configure_jax``: matmul precision and the persistent compilation cache of the run;
* ``devices`` / ``setup_model``: the mesh over the run's devices, the model of ``model.family`` (random or
  from ``model.pretrained``) split into graph, parameters and BatchNorm statistics (none for
  ``unimatch_v2``);
* ``make_evaluator``: the validation-set evaluator of ``config.eval``.

Shared by the training loop (``zsp_jax.train.loop``), checkpoint evaluation
(``zsp_jax.train.checkpoint_eval``) and relabelling (``zsp_jax.train.relabel``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from zsp_jax.data import classes
from zsp_jax.data import inputs as data_inputs
from zsp_jax.runtime import enable_compilation_cache
from zsp_jax.train import evaluation
from zsp_jax.train import state as state_lib


def is_main_process() -> bool:
    return jax.process_index() == 0


def say(text: str) -> None:
    """A line on the console of process 0 (above any progress bar)."""
    if is_main_process():
        tqdm.tqdm.write(text)


def host_value(tree: Any) -> Any:
    """A replicated (possibly multi-process) pytree's value on this host, as numpy arrays."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def configure_jax(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Matmul precision (``train.matmul_precision``) and the persistent compilation cache
    (``train.compilation_cache``: ``<workdir>/jax_cache``, so a resumed run does not recompile)."""
    t = config.train
    if t.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", t.matmul_precision)
    if t.compilation_cache and not jax.config.jax_compilation_cache_dir:  # else JAX's own, as it is set
        enable_compilation_cache(os.path.join(workdir, "jax_cache"), min_compile_time_secs=1.0)


@dataclasses.dataclass
class Setup:
    """The mesh placement and the model of a run, split into its pytrees."""

    placement: state_lib.Placement
    graphdef: nnx.GraphDef
    params: Any
    batch_stats: Any
    model_description: str
    family: str = "deeplab"


def devices(config: ml_collections.ConfigDict) -> list[Any]:
    """The devices of the run: the first ``train.num_devices`` of each process (in process order); with
    0, all of them, or, when ``train.batch_size`` does not split over all, the most that it splits over
    (said on the console: e.g. the smoke config's batch of 4 on 8 devices uses 4)."""
    n = config.train.get("num_devices", 0)
    per_process, processes = jax.local_device_count(), jax.process_count()
    if not n:
        batch = config.train.batch_size
        n = jax.device_count()
        if batch % n == 0:
            return jax.devices()
        n = max((k for k in range(processes, n + 1, processes) if batch % k == 0), default=0)
        if not n:
            raise ValueError(f"config field train.batch_size={batch}: must be a multiple of the number of "
                             f"processes ({processes})")
        say(f"train.batch_size={batch} does not split over {jax.device_count()} devices: using {n} "
            f"(set train.num_devices, or a batch size that is a multiple of the device count)")
    if n % processes or n // processes > per_process:
        raise ValueError(f"config field train.num_devices={n}: expected a multiple of the process count "
                         f"({processes}) up to {per_process * processes}")
    per_process_used = n // processes
    by_process: dict[int, list[Any]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    return [device for p in sorted(by_process) for device in by_process[p][:per_process_used]]


def setup_model(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """The mesh, the model (random or from ``model.pretrained``) and its split state for ``config``."""
    mesh = state_lib.make_mesh(config.train.fsdp, devices(config))
    model, description = state_lib.build_model(config, workdir=workdir)
    graphdef, params, stats = state_lib.split_model(model)
    placement = state_lib.Placement(mesh, None, state_lib.batch_sharding(mesh))
    return Setup(placement, graphdef, params, stats, description, state_lib.family(config))


def make_evaluator(config: ml_collections.ConfigDict, setup: Setup) -> tuple[evaluation.Evaluator, Any]:
    """The validation-set evaluator for ``config.eval`` and the evaluation sources (with their problems)."""
    sources = data_inputs.eval_sources(config)
    e = config.eval
    evaluator = evaluation.Evaluator(setup.graphdef, sources.source, sources.sizes, setup.placement, mode=e.mode,
                                     crop=config.train.crop_size, bucket=e.bucket, batch_size=e.batch_size,
                                     num_classes=config.data.num_classes,
                                     class_names=classes.CLASSES.get(config.data.dataset), threads=e.threads,
                                     family=setup.family)
    return evaluator, sources

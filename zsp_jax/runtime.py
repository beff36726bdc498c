"""Process set-up of the main job: several processes (``jax.distributed``), where logs go, the CPU XLA flags
and the persistent compilation cache (``compile_cache_path``, ``enable_compilation_cache``).

``init_distributed(config)`` starts ``jax.distributed`` when the job runs as several processes:

* explicitly, with ``config.distributed.coordinator_address`` (``host:port`` of process 0),
  ``num_processes`` and ``process_id`` (``local_device_ids`` optional) — e.g. two processes on
  one machine over loopback;
* automatically (``distributed.mode="auto"``) when the environment describes a cluster that JAX
  recognises: a SLURM job step with several tasks (``srun``), a Cloud TPU pod slice, or the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables; JAX then
  reads the addresses itself (``jax.distributed.initialize()`` without arguments).

On CPU the processes' collectives go through gloo (``jax_cpu_collectives_implementation``),
which cross-process training on CPU needs.

``route_logs(workdir, verbose)`` sends library logging (absl ``I...`` lines, JAX's backend
probing, TFDS, grain, orbax) to ``<workdir>/logs/<process>.log`` so that the console shows the
job's own progress and results; ``--config.verbose=True`` keeps it on the console as well.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from zsp_jax.config_utils import Setting, section

MODES = ("auto", "on", "off")

# XLA:CPU's YNNPACK fusions take convolutions by default; routing them back to XLA's own (Eigen)
# convolutions makes the DeepLab train step 1.7x faster on CPU (docs/benchmarks.md). Accelerator
# backends do not read it.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
CPU_XLA_FLAGS_ENV = "ZSP_JAX_CPU_XLA_FLAGS"


def set_cpu_xla_flags() -> str:
    """Adds ``CPU_XLA_FLAGS`` to ``XLA_FLAGS`` (before JAX starts its backends) unless the variable
    already sets them or ``ZSP_JAX_CPU_XLA_FLAGS=0``; returns the flags added ("" if none)."""
    if os.environ.get(CPU_XLA_FLAGS_ENV, "1") == "0":
        return ""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return " ".join(added)



def compile_cache_path(configured: str, fallback: str) -> str:
    """Where the persistent compilation cache lives: ``configured`` (``label.compile_cache_dir``), else JAX's own
    directory where one is set (``JAX_COMPILATION_CACHE_DIR``: shared with the user's other JAX programs), else
    ``fallback``."""
    import jax

    return os.path.expanduser(configured) or jax.config.jax_compilation_cache_dir or fallback


def enable_compilation_cache(path: str, *, min_compile_time_secs: float = 0.0) -> None:
    """JAX's persistent compilation cache in ``path``, for every program that takes at least
    ``min_compile_time_secs`` to compile."""
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

DISTRIBUTED = (
    Setting("mode", "auto", "auto: when the fields below or a cluster's environment ask for it | on | off"),
    Setting("coordinator_address", "", "host:port of process 0 (an explicit launch)"),
    Setting("num_processes", 1, "processes of an explicit launch"),
    Setting("process_id", 0, "this process's index in an explicit launch"),
    Setting("local_device_ids", "", "e.g. \"0,1\": the devices this process uses (\"\": all)"),
)


def default_distributed_config() -> Any:
    """The ``distributed`` section of the configs (docs/multi_host.md)."""
    return section(DISTRIBUTED)


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1 and \
            "SLURM_STEP_ID" in os.environ:
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return any(os.environ.get(v) for v in _CLUSTER_ENV if v != "TPU_WORKER_HOSTNAMES") or "," in tpu_hosts


def init_distributed(config: Any) -> str:
    """Starts ``jax.distributed`` if the config or the environment asks for it; returns a line saying what ran."""
    import jax

    d = config.get("distributed")
    mode = d.mode if d is not None else "auto"
    if mode not in MODES:
        raise ValueError(f"config field distributed.mode={mode!r}: expected one of {list(MODES)}")
    explicit = d is not None and bool(d.coordinator_address)
    if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
        return "1 process"
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
        # Harmless on GPU/TPU hosts (it only concerns CPU devices); needed for CPU collectives across processes.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
            raise ValueError(f"config fields distributed.num_processes={d.num_processes} / process_id={d.process_id}:"
                             " need num_processes >= 1 and 0 <= process_id < num_processes")
        kwargs: dict[str, Any] = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                      process_id=d.process_id)
        if d.local_device_ids:
            kwargs["local_device_ids"] = [int(i) for i in str(d.local_device_ids).split(",")]
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize()
    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local of "
            f"{jax.device_count()} devices")


def route_logs(workdir: str, *, verbose: bool = False, process_index: int | None = None) -> str:
    """Library logging -> ``<workdir>/logs/process-<i>.log`` (and the console too when ``verbose``)."""
    from absl import logging as absl_logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    folder = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "logs")
    os.makedirs(folder, exist_ok=True)
    index = process_index if process_index is not None else int(os.environ.get("JAX_PROCESS_ID", "0") or 0)
    path = os.path.join(folder, f"process-{index}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if not verbose:
        for h in list(root.handlers):
            root.removeHandler(h)
        absl_logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass
    return path


def quiet_other_processes(log_file: str) -> None:
    """On every process but 0, printed output goes to ``log_file`` and progress bars are off: the console
    shows one job, not N copies of it (errors still reach stderr)."""
    import sys

    import jax

    if jax.process_index() == 0:
        return
    os.environ["TQDM_DISABLE"] = "1"
    sys.stdout = open(log_file, "a", buffering=1)  # noqa: SIM115 - for the life of the process

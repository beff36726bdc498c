"""The zsp_jax main job: checkpoints and a dataset in; pseudo labels, a trained model and its mIoU out.

    python -m zsp_jax.main --config configs/smoke.py                       # generated data, tiny models
    python -m zsp_jax.main --config configs/voc.py:split=1464 --config.data.root=/data/VOCdevkit/VOC2012
    python -m zsp_jax.main --config configs/voc.py --config.stages=train,eval

Stages and what each skips when rerun: ``zsp_jax.stages``. Several processes: ``zsp_jax.runtime``.
Kept short on purpose; the work lives in importable modules.
"""

from __future__ import annotations

import os
import sys

from absl import app
from ml_collections import config_flags

from zsp_jax.runtime import set_cpu_xla_flags

set_cpu_xla_flags()  # before any JAX backend starts

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "config file[:variant args]", lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from zsp_jax import preflight, runtime, stages
    from zsp_jax.label.checkpoints import CheckpointError
    from zsp_jax.train.stage import TrainingDiverged

    config = _CONFIG.value
    d = config.get("distributed")
    log_file = runtime.route_logs(config.workdir, verbose=bool(config.get("verbose", False)),
                                  process_index=d.process_id if d is not None and d.coordinator_address else None)
    print(f"zsp_jax: {runtime.init_distributed(config)}; library logs in {log_file}")
    runtime.quiet_other_processes(log_file)
    try:
        stages.run(config)
    except (preflight.InputProblems, CheckpointError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

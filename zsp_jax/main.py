"""The zsp_jax main job: checkpoints and a dataset in; pseudo labels, a trained model and its mIoU out.

    python -m zsp_jax.main --config configs/smoke.py                       # generated data, tiny models
    python -m zsp_jax.main --config configs/voc.py:split=1464 --config.data.root=/data/VOCdevkit/VOC2012
    python -m zsp_jax.main --config configs/voc.py --config.stages=train,eval

Stages and what each skips when rerun: ``zsp_jax.workflow``. Several processes: ``zsp_jax.runtime``.
A mistake is one ``error:`` line and exit code 2 (``zsp_jax.cli``). Kept short on purpose; the work
lives in importable modules.
"""

from __future__ import annotations

import os

from absl import app

from zsp_jax import cli
from zsp_jax.runtime import set_cpu_xla_flags

set_cpu_xla_flags()  # before any JAX backend starts

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")
_CONFIG = cli.define_config_flag(_DEFAULT)


def main(argv: list[str]) -> None:
    logs: dict[str, str] = {}

    def run() -> None:
        from zsp_jax import runtime, workflow
        from zsp_jax.utils import io

        config = _CONFIG.value
        problem = io.writable_dir_problem(config.workdir)
        if problem:
            raise cli.UsageError(f"config.workdir={config.workdir!r}: {problem}; give a writable folder with "
                                 f"--config.workdir=...")
        distributed = config.get("distributed")
        logs["file"] = runtime.route_logs(config.workdir, verbose=bool(config.get("verbose", False)),
                                          process_index=distributed.process_id
                                          if distributed is not None and distributed.coordinator_address else None)
        print(f"zsp_jax: {runtime.init_distributed(config)}; library logs in {logs['file']}")
        runtime.quiet_other_processes(logs["file"])
        workflow.run(config)

    cli.run_main(run, verbose=lambda: bool(_CONFIG.value.get("verbose", False)), log_file=lambda: logs.get("file"))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

"""The zsp_jax main job.

    python -m zsp_jax.main --config configs/smoke.py
    python -m zsp_jax.main --config configs/voc.py:split=1464 --config.data.root=/data/VOCdevkit/VOC2012

For now it runs the data stage (``zsp_jax.data.stage``): prepare and check the data, run the
training input for a few batches, write a preview. Kept short on purpose; the work lives in
importable modules.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from zsp_jax.data import stage

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "config file[:variant args]",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    stage.run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)

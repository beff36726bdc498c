"""The train stage's entry: ``run(config)`` validates the trainer's fields and trains ``train.mode``.

Enhanced-label option C (``train.mode="zsp"``, ``train.enhanced="relabel"``) is two training runs
with a relabelling between them (``zsp_jax.train.relabel``); every other mode is one run of the
loop (``zsp_jax.train.loop``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from zsp_jax.train import config as train_config
from zsp_jax.train import loop, relabel


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains (or resumes, or returns the finished run's summary); returns the run's summary."""
    train_config.validate(config)
    if config.train.mode == "zsp" and config.train.enhanced == "relabel":
        return relabel.run_two_stage(config)
    return loop.train(config)

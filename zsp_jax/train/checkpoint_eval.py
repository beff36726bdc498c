"""Evaluating a trained checkpoint on the validation list: the ``eval`` stage of ``zsp_jax.main`` and
``python -m zsp_jax.evaluate``.

``evaluate(config, checkpoint)`` takes a run's work directory (its best checkpoint, as the run
recorded it), one of its ``checkpoints/<step>`` directories, a converted ``.safetensors``
(``tools/convert_backbone.py``) or a UniMatch-trained ``.pth`` (converted in memory; needs torch),
and returns mIoU, per-class IoU and pixel accuracy in ``config.eval.mode``.

``find_best(workdir)`` reads the run's record from its newest readable checkpoint: the best step by
mIoU (kept on disk whatever happened to the run), or the latest step when nothing was evaluated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from zsp_jax.train import checkpointing
from zsp_jax.train import config as train_config
from zsp_jax.train import state as state_lib
from zsp_jax.train.loop import CHECKPOINTS
from zsp_jax.train.setup import configure_jax, is_main_process, make_evaluator, say, setup_model
from zsp_jax.utils import io


class CheckpointNotFound(FileNotFoundError):
    """The checkpoint to evaluate does not exist or holds nothing to evaluate."""


@dataclasses.dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint a run's evaluation uses.

    Attributes:
      path: ``<workdir>/checkpoints/<step>``.
      step: its step.
      miou: its mIoU when the run evaluated it (None for a latest checkpoint never evaluated).
      is_best: True for the best by mIoU, False when the run evaluated nothing (its latest step).
    """

    path: str
    step: int
    miou: float | None
    is_best: bool

    def describe(self) -> str:
        if self.is_best:
            return f"the best checkpoint, step {self.step} (mIoU {self.miou:.2f} during training)"
        return f"the latest checkpoint, step {self.step} (the run evaluated none)"


def find_best(workdir: str) -> BestCheckpoint | None:
    """The best checkpoint of a finished or running training in ``workdir`` (None if it has none)."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return None
    checkpoints = checkpointing.Checkpointer(directory, read_only=True)
    try:
        restored = checkpoints.restore_latest(None, None, say=say)
        if restored is None:
            return None
        steps = checkpoints.all_steps()
    finally:
        checkpoints.close()
    best = restored.meta.get("best_step")
    if best is not None and best in steps:
        return BestCheckpoint(checkpoints.path(best), best, restored.meta.get("best_miou"), True)
    if best is not None:
        say(f"the run's best checkpoint (step {best}) is gone from {directory}; using the latest, step "
            f"{restored.step}")
    return BestCheckpoint(checkpoints.path(restored.step), restored.step, None, False)


def load_weights(config: ml_collections.ConfigDict, setup: Any, checkpoint: str) -> tuple[Any, Any, str]:
    """(params, batch_stats, description) from a run directory (its best checkpoint), a
    ``checkpoints/<step>`` directory, a converted ``.safetensors`` or a UniMatch ``.pth``."""
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isfile(path):  # a converted .safetensors or a UniMatch .pth (converted in memory)
        from zsp_jax.models.deeplab import convert

        model, report = convert.load_model(path, config=state_lib.model_config(config),
                                           dtype=state_lib.compute_dtype(config))
        if report.random_parts:
            raise ValueError(f"checkpoint {checkpoint}: it holds only a backbone ({report.summary()}); evaluate a "
                             f"trained checkpoint (a run's workdir, its checkpoints/<step>, or a trained .pth)")
        _, params, stats = state_lib.split_model(state_lib.strip_rng_streams(model))
        return params, stats, f"{path} ({report.summary()})"
    if os.path.basename(path).isdigit() and os.path.isdir(path):  # <run>/checkpoints/<step>
        directory, step, description = os.path.dirname(path), int(os.path.basename(path)), path
    elif os.path.isdir(os.path.join(path, CHECKPOINTS)):  # a run's workdir: its best checkpoint
        best = find_best(path)
        if best is None:
            raise CheckpointNotFound(f"checkpoint {checkpoint}: {path}/{CHECKPOINTS} holds no checkpoint")
        directory, step, description = os.path.dirname(best.path), best.step, f"{best.path}: {best.describe()}"
    else:
        raise CheckpointNotFound(f"checkpoint {checkpoint}: no such file or directory (give a run's workdir, its "
                                 f"checkpoints/<step> directory, a .safetensors or a UniMatch .pth)")
    shardings = state_lib.state_shardings((setup.params, setup.batch_stats), setup.placement.mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            (setup.params, setup.batch_stats), shardings)
    try:
        params, stats = checkpointing.restore_params(directory, step, *abstract)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint directory
        raise CheckpointNotFound(f"checkpoint {path}: cannot be read ({checkpointing.short_reason(e)}); "
                                 f"is it a checkpoint of a run of this config (model.backbone, data.num_classes)?"
                                 ) from e
    return params, stats, description


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | None = None, *,
             output: str | None = None) -> dict[str, Any]:
    """Evaluates a checkpoint on ``<data.splits_dir>/val.txt`` in ``config.eval.mode``.

    Args:
      config: the run's config (model, data, eval fields).
      checkpoint: a run's workdir (its best checkpoint), a ``checkpoints/<step>`` directory, a converted
        ``.safetensors`` or a UniMatch ``.pth``; default: the best checkpoint of ``config.workdir``.
      output: where to write the result JSON (default ``<workdir>/eval_<mode>.json``).

    Returns:
      ``metrics.summarize`` output plus ``checkpoint``, ``images``, ``seconds``, ``mode`` and ``output``.
    """
    train_config.validate_for_eval(config)
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    if checkpoint is None:
        checkpoint = workdir
        if find_best(workdir) is None:
            raise CheckpointNotFound(f"no checkpoint in {workdir}/{CHECKPOINTS}: train first, or give --checkpoint")
    os.makedirs(workdir, exist_ok=True)
    configure_jax(config, workdir)
    setup = setup_model(config, workdir)
    params, stats, description = load_weights(config, setup, checkpoint)
    shardings = state_lib.state_shardings((params, stats), setup.placement.mesh)
    params, stats = state_lib.place((params, stats), shardings)
    evaluator, sources = make_evaluator(config, setup)
    say(f"evaluating {description} on {len(sources.sizes)} images ({config.eval.mode}, {len(evaluator.canvases)} "
        f"canvas shape(s)); {len(sources.problems)} bad input file(s) left out")
    result = evaluator.evaluate(params, stats)
    result["checkpoint"] = description
    output = output or os.path.join(workdir, f"eval_{config.eval.mode}.json")
    result["output"] = output
    if is_main_process():
        io.write_json_atomic(output, result)
    say(f"mIoU {result['miou']:.2f} ({result['images']} images, {result['seconds']:.1f} s); {output}")
    return result

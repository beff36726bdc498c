"""Evaluating a trained checkpoint on the validation list: the ``eval`` stage of ``zsp_jax.main`` and
``python -m zsp_jax.evaluate``.

``evaluate(config, checkpoint)`` takes a run's work directory (its best checkpoint, as the run
recorded it), one of its ``checkpoints/<step>`` directories, a converted ``.safetensors``
(``tools/convert_backbone.py``) or a UniMatch-trained ``.pth`` (converted in memory; needs torch),
and returns mIoU, per-class IoU and pixel accuracy in ``config.eval.mode``.

``model.family=unimatch_v2``: ``eval.weights`` (or the ``weights`` argument) picks the EMA teacher
(``ema``, the default: what V2 reports) or the student (``student``): from a run, the checkpoint the run
recorded as that one's best and its ``ema_params`` / ``params``; from a UniMatch V2 ``latest.pth`` /
``best.pth``, its ``model_ema`` / ``model`` entry (``zsp_jax.models.dpt.convert``; a ``supervised.py`` file
has only ``model``, which is then taken); from a converted V2 ``.safetensors``, its weights.

``find_best(workdir)`` reads the run's record from its newest readable checkpoint: the best step by
mIoU (kept on disk whatever happened to the run; V2: the EMA's best or the student's), or the latest
step when nothing was evaluated.
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
      weights: ``student`` (the trained parameters) or ``ema`` (a UniMatch V2 run's EMA teacher).
    """

    path: str
    step: int
    miou: float | None
    is_best: bool
    weights: str = "student"

    def describe(self) -> str:
        if self.weights == "ema":
            if self.is_best:
                return (f"the EMA teacher of the best-EMA checkpoint, step {self.step} (EMA mIoU {self.miou:.2f} "
                        f"during training)")
            return f"the EMA teacher of the latest checkpoint, step {self.step} (the run evaluated none)"
        if self.is_best:
            return f"the best checkpoint, step {self.step} (mIoU {self.miou:.2f} during training)"
        return f"the latest checkpoint, step {self.step} (the run evaluated none)"


def find_best(workdir: str, weights: str = "ema") -> BestCheckpoint | None:
    """The best checkpoint of a finished or running training in ``workdir`` (None if it has none).

    ``weights``: for a UniMatch V2 run, ``ema`` (the EMA teacher's best checkpoint) or ``student``; a deeplab
    run has only its student.
    """
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
    which = "ema" if restored.meta.get("family") == "unimatch_v2" and weights == "ema" else "student"
    prefix = "best_ema" if which == "ema" else "best"
    best = restored.meta.get(f"{prefix}_step")
    if best is not None and best in steps:
        return BestCheckpoint(checkpoints.path(best), best, restored.meta.get(f"{prefix}_miou"), True, which)
    if best is not None:
        say(f"the run's best checkpoint (step {best}) is gone from {directory}; using the latest, step "
            f"{restored.step}")
    return BestCheckpoint(checkpoints.path(restored.step), restored.step, None, False, which)


def _weights_choice(config: ml_collections.ConfigDict, weights: str | None) -> str:
    """``ema`` or ``student``: the argument, else ``eval.weights``; always ``student`` for the deeplab family."""
    if state_lib.family(config) != "unimatch_v2":
        return "student"
    choice = weights or config.eval.get("weights", "ema")
    if choice not in train_config.EVAL_WEIGHTS:
        raise ValueError(f"config field eval.weights={choice!r}: expected one of {list(train_config.EVAL_WEIGHTS)}")
    return choice


def load_v2_file(config: ml_collections.ConfigDict, path: str, weights: str) -> tuple[Any, Any, str]:
    """(params, empty batch_stats, description) of a UniMatch V2 ``.pth`` (its ``model_ema`` / ``model``) or a
    converted V2 ``.safetensors``, checked against the config's model (``model.encoder``, ``data.num_classes``)."""
    from zsp_jax.models.dpt import convert as dpt_convert

    want = state_lib.model_config(config)
    dtype = state_lib.compute_dtype(config)
    if path.endswith(".safetensors"):
        stored = dpt_convert.read_config(path)
        if stored.replace(lock_backbone=want.lock_backbone) != want:
            raise ValueError(f"checkpoint {path}: it holds a {stored.variant} segmenter with {stored.num_classes} "
                             f"classes; the config asks for {want.variant} with {want.num_classes} "
                             f"(model.encoder, data.num_classes)")
        model = dpt_convert.load_model(path, dtype=dtype, lock_backbone=want.lock_backbone)
        entry = "converted"
    else:
        # the student asked for: "model"; the teacher: "model_ema" when the file has it (supervised.py's have not)
        converted = dpt_convert.convert_checkpoint(path, want, entry="model" if weights == "student" else None,
                                                   lock_backbone=want.lock_backbone)
        model = converted.build(dtype=dtype)
        entry = converted.entry or "state_dict"
        if weights == "ema" and entry != "model_ema":
            what = ("its model entry (as V2's supervised.py saves)" if entry == "model"
                    else "its weights (a bare state_dict, no model_ema entry)")
            say(f"{path} has no EMA teacher: evaluating {what}")
    _, params, stats = state_lib.split_model(model)
    return params, stats, f"{path} ({entry}, {want.variant})"


def load_weights(config: ml_collections.ConfigDict, setup: Any, checkpoint: str, weights: str | None = None
                 ) -> tuple[Any, Any, str]:
    """(params, batch_stats, description) from a run directory (its best checkpoint), a
    ``checkpoints/<step>`` directory, a converted ``.safetensors`` or a UniMatch ``.pth``; for the
    ``unimatch_v2`` family the EMA teacher's or the student's (``weights``, default ``eval.weights``)."""
    which = _weights_choice(config, weights)
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isfile(path) and setup.family == "unimatch_v2":
        return load_v2_file(config, path, which)
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
        best = find_best(path, which)
        if best is None:
            raise CheckpointNotFound(f"checkpoint {checkpoint}: {path}/{CHECKPOINTS} holds no checkpoint")
        directory, step, description = os.path.dirname(best.path), best.step, f"{best.path}: {best.describe()}"
    else:
        raise CheckpointNotFound(f"checkpoint {checkpoint}: no such file or directory (give a run's workdir, its "
                                 f"checkpoints/<step> directory, a .safetensors or a UniMatch .pth)")
    shardings = state_lib.state_shardings((setup.params, setup.batch_stats), setup.placement.mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            (setup.params, setup.batch_stats), shardings)
    fields = "model.family, model.encoder" if setup.family == "unimatch_v2" else "model.backbone"
    try:
        if setup.family == "unimatch_v2":  # the EMA teacher or the student; the segmenter has no statistics
            key = "ema_params" if which == "ema" else "params"
            params, stats = checkpointing.restore_items(directory, step, {key: abstract[0]})[key], setup.batch_stats
            description += f" ({'EMA teacher' if which == 'ema' else 'student'})"
        else:
            params, stats = checkpointing.restore_params(directory, step, *abstract)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint directory
        raise CheckpointNotFound(f"checkpoint {path}: cannot be read ({checkpointing.short_reason(e)}); "
                                 f"is it a checkpoint of a run of this config ({fields}, data.num_classes)?"
                                 ) from e
    return params, stats, description


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | None = None, *,
             output: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Evaluates a checkpoint on ``<data.splits_dir>/val.txt`` in ``config.eval.mode``.

    Args:
      config: the run's config (model, data, eval fields).
      checkpoint: a run's workdir (its best checkpoint), a ``checkpoints/<step>`` directory, a converted
        ``.safetensors`` or a UniMatch (V2) ``.pth``; default: the best checkpoint of ``config.workdir``.
      output: where to write the result JSON (default ``<workdir>/eval_<mode>.json``).
      weights: ``unimatch_v2``: ``ema`` or ``student`` (default ``eval.weights``; see the module docstring).

    Returns:
      ``metrics.summarize`` output plus ``checkpoint``, ``images``, ``seconds``, ``mode``, ``weights`` and
      ``output``.
    """
    train_config.validate_for_eval(config)
    which = _weights_choice(config, weights)
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    if checkpoint is None:
        checkpoint = workdir
        if find_best(workdir, which) is None:
            raise CheckpointNotFound(f"no checkpoint in {workdir}/{CHECKPOINTS}: train first, or give --checkpoint")
    os.makedirs(workdir, exist_ok=True)
    configure_jax(config, workdir)
    # The checkpoint holds every weight: the model is built without reading model.pretrained (which an evaluation
    # should not need on disk, nor convert).
    bare = config.copy_and_resolve_references()
    with bare.unlocked():
        bare.model.pretrained = ""
    setup = setup_model(bare, workdir)
    params, stats, description = load_weights(config, setup, checkpoint, which)
    shardings = state_lib.state_shardings((params, stats), setup.placement.mesh)
    params, stats = state_lib.place((params, stats), shardings)
    evaluator, sources = make_evaluator(config, setup)
    say(f"evaluating {description} on {len(sources.sizes)} images ({config.eval.mode}, {evaluator.programs} "
        f"program shape(s)); {len(sources.problems)} bad input file(s) left out")
    result = evaluator.evaluate(params, stats)
    result["checkpoint"] = description
    result["weights"] = which
    output = output or os.path.join(workdir, f"eval_{config.eval.mode}.json")
    result["output"] = output
    if is_main_process():
        io.write_json_atomic(output, result)
    say(f"mIoU {result['miou']:.2f} ({result['images']} images, {result['seconds']:.1f} s); {output}")
    return result

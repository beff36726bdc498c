"""The main job's stages, in order: convert -> label -> train -> eval, each skipping work already done.

* ``data`` (only when asked for): the training input pipeline for a few batches and its
  preview (``zsp_jax.data.inputs``);
* ``convert``: PyTorch checkpoints named in the config (``label.sam_checkpoint``,
  ``label.clip_checkpoint``, ``model.pretrained``) are converted once to ``.safetensors`` in the
  work directory (reused while the source is unchanged);
* ``label``: zero-shot pseudo labels of the unlabelled split (``zsp_jax.label.labelling``): finished
  images are skipped; ``data.pseudo_labels`` defaults to its output;
* ``train``: the model of ``model.family`` (DeepLabV3+, or UniMatch V2's DINOv2 + DPT) in ``train.mode``
  (``zsp_jax.train.training``): resumes from the last checkpoint; a finished run returns its summary;
* ``eval``: the best checkpoint on the validation list (skipped when that checkpoint was
  already evaluated in this mode); for ``unimatch_v2`` the EMA teacher of the best-EMA checkpoint
  (``eval.weights=ema``, V2's reported result) or the student of the best-student one (``student``).

``config.stages`` ("convert,label,train,eval" by default) selects stages. Before any of them,
every input they need is checked (``zsp_jax.preflight``); all problems are reported at once.
Generated data (``config.synthetic``, the smoke run) is written first. At the end, process 0
writes ``<workdir>/summary.json`` with where every output is and the final and best mIoU.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from zsp_jax import preflight
from zsp_jax.config_utils import Setting
from zsp_jax.utils import io
from zsp_jax.utils.sharding import barrier

STAGES = ("data", "convert", "label", "train", "eval")
DEFAULT_STAGES = "convert,label,train,eval"  # "data" (the input pipeline's preview) runs when asked for

RUN = (
    Setting("seed", 0, "seed of the model's initialisation, the input order and the augmentations"),
    Setting("workdir", "runs/run", "the run's outputs: checkpoints, logs, plots, pseudo labels, reports"),
    Setting("stages", DEFAULT_STAGES, "stages to run, in this order; each skips work already done ("
                                      + " | ".join(STAGES) + ")"),
    Setting("verbose", False, "library logs and tracebacks on the console too (always in <workdir>/logs)"),
)


def selected(config: ml_collections.ConfigDict) -> list[str]:
    """``config.stages`` as an ordered list; unknown names are an error naming the field."""
    names = [s.strip() for s in str(config.get("stages", DEFAULT_STAGES)).split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"config field stages={config.get('stages')!r}: unknown stage(s) {unknown}; "
                         f"choose from {list(STAGES)} (comma-separated)")
    mode = config.train.get("mode") if "train" in config else None
    if mode not in (None, "zsp") and "label" in names and config.get("stages") == DEFAULT_STAGES:
        # The baselines train on the labelled images (and UniMatch's own targets): no zero-shot labels to make.
        print(f"train.mode={mode} uses no pseudo labels: the label stage is skipped (list it in --config.stages "
              f"to run it anyway)")
        names.remove("label")
    return [s for s in STAGES if s in names]


def prepare_generated(config: ml_collections.ConfigDict) -> None:
    """The smoke run's generated dataset and random checkpoints (process 0; idempotent)."""
    s = config.synthetic
    if jax.process_index() == 0:
        from zsp_jax.data.inputs import prepare_synthetic

        prepare_synthetic(config)
        if s.get("checkpoints"):
            from zsp_jax.models.random_checkpoints import tiny_checkpoints

            tiny_checkpoints(os.path.expanduser(s.checkpoints), seed=config.seed)
    barrier("zsp_generated_inputs")


def convert(config: ml_collections.ConfigDict, stages: list[str]) -> dict[str, str]:
    """Converts the PyTorch checkpoints the selected stages need; returns {field: converted path}."""
    from zsp_jax.label import model_files
    from zsp_jax.label.labelling import out_dir_of

    done: dict[str, str] = {}
    if jax.process_index() == 0:
        c = config.label
        if "label" in stages:
            cache = os.path.join(out_dir_of(config), "checkpoints")
            if c.sam_checkpoint and not c.sam_checkpoint.endswith(".safetensors"):
                done["label.sam_checkpoint"] = model_files.sam_safetensors(c.sam_checkpoint, cache,
                                                                           allow_custom=c.sam_allow_custom)
            if c.clip_checkpoint and not c.clip_checkpoint.endswith(".safetensors"):
                done["label.clip_checkpoint"] = model_files.clip_safetensors(c.clip_checkpoint, cache,
                                                                             model_name=c.clip_model_name)
        if "train" in stages and config.model.get("pretrained") and not config.model.pretrained.endswith(".safetensors"):
            from zsp_jax.train import state

            done["model.pretrained"] = state.pretrained_safetensors(
                config.model.pretrained, os.path.abspath(os.path.expanduser(config.workdir)),
                state.model_config(config))
    barrier("zsp_convert")
    return done


def build_dataset_once(config: ml_collections.ConfigDict, *, log: Any = print) -> None:
    """``data.source="tfds"``: process 0 builds (or checks) the ArrayRecord dataset, the others wait for it
    (two processes building into one folder would collide). TFDS's own messages go to the log file."""
    import contextlib
    import logging

    from zsp_jax.data import readers, tfds_builders

    d = config.data
    if d.source != "tfds":
        return
    if jax.process_index() == 0:
        if not tfds_builders.is_built(d.dataset, os.path.expanduser(d.tfds_dir)):
            log(f"building the TFDS dataset once in {d.tfds_dir} (every file is checked) ...")
        layout = readers.make_layout(d.dataset, os.path.expanduser(d.root))
        sink = _LogWriter(logging.getLogger("tfds"))
        with contextlib.redirect_stdout(sink):
            tfds_builders.build(d.dataset, layout.root, os.path.expanduser(d.tfds_dir), on_bad_input=d.on_bad_input)
    barrier("zsp_tfds_built")


class _LogWriter:
    """A file-like object that sends printed lines to a logger."""

    def __init__(self, logger: Any):
        self.logger = logger

    def write(self, text: str) -> int:
        if text.strip():
            self.logger.info(text.strip())
        return len(text)

    def flush(self) -> None:
        pass


def _evaluate(config: ml_collections.ConfigDict, *, log: Any = print) -> dict[str, Any]:
    """Evaluates the run's best checkpoint (as recorded by the training run; V2: the EMA's best and its EMA
    teacher, or with ``eval.weights=student`` the student's), unless it was already."""
    from zsp_jax.train import checkpoint_eval

    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    weights = config.eval.get("weights", "ema") if config.model.get("family", "deeplab") == "unimatch_v2" else "student"
    best = checkpoint_eval.find_best(workdir, weights)
    if best is None:
        raise checkpoint_eval.CheckpointNotFound(f"no checkpoint in {workdir}/checkpoints: run the train stage "
                                                 f"first (--config.stages=train,eval)")
    marker = os.path.join(workdir, f"eval_{config.eval.mode}.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous.get("checkpoint_path") == best.path and previous.get("weights", "student") == best.weights:
            return previous
    log(f"evaluating {best.describe()}")
    result = checkpoint_eval.evaluate(config, best.path, weights=best.weights)
    result.update(checkpoint_path=best.path, checkpoint_step=best.step, is_best=best.is_best, weights=best.weights)
    if jax.process_index() == 0:
        io.write_json_atomic(marker, result)
    return result


def run(config: ml_collections.ConfigDict, *, log: Any = print) -> dict[str, Any]:
    """Runs the selected stages; returns the summary (written to ``<workdir>/summary.json``)."""
    stages = selected(config)
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    os.makedirs(workdir, exist_ok=True)
    if config.get("synthetic"):
        prepare_generated(config)
    problems = preflight.check(config, set(stages))
    if problems:
        raise preflight.InputProblems(problems)
    if "label" in config and not config.label.compile_cache_dir:
        from zsp_jax.runtime import compile_cache_path

        with config.unlocked():  # one persistent compilation cache for every stage of the run
            config.label.compile_cache_dir = compile_cache_path("", os.path.join(workdir, "jax_cache"))
    summary: dict[str, Any] = {"workdir": workdir, "stages": stages, "processes": jax.process_count()}
    if "data" in stages:
        from zsp_jax.data import preview

        log("== stage data: the training input pipeline")
        summary["data"] = preview.run_data_stage(config)
    if "convert" in stages:
        summary["converted"] = convert(config, stages)
        with config.unlocked():  # later stages read the converted files (no torch needed from here on)
            for field, path in summary["converted"].items():
                section, name = field.split(".")
                config[section][name] = path
    if "label" in stages:
        from zsp_jax.label import labelling

        log("== stage label: zero-shot pseudo labels")
        result = labelling.run(config, log=log, progress=jax.process_index() == 0)
        summary["label"] = {k: result.get(k) for k in ("out_dir", "labels_dir", "manifest", "report", "eval",
                                                       "labelled_total", "failed_total", "miou")}
    if stages and set(stages) & {"train"} and config.train.mode == "zsp" and not config.data.get("pseudo_labels"):
        from zsp_jax.label.labelling import labels_dir_of

        with config.unlocked():
            config.data.pseudo_labels = labels_dir_of(config)
    if set(stages) & {"train", "eval"} and not (config.get("synthetic") is None and "data" not in config):
        build_dataset_once(config, log=log)
    if "train" in stages:
        from zsp_jax.train import training

        log(f"== stage train: {config.train.mode}")
        result = training.run(config)
        summary["train"] = result
        summary["final_miou"] = result.get("final_miou")
        summary["best_miou"] = result.get("best_miou")
        if "best_ema_miou" in result:  # unimatch_v2: the EMA teacher's figures, the best of which V2 reports
            summary.update(final_miou_ema=result.get("final_miou_ema"), best_ema_miou=result.get("best_ema_miou"))
    if "eval" in stages:
        log(f"== stage eval: {config.eval.mode}")
        result = _evaluate(config, log=log)
        summary["eval"] = {k: result.get(k) for k in ("miou", "checkpoint", "checkpoint_step", "is_best", "images",
                                                     "output", "mode", "weights")}
        summary["eval"]["per_class"] = result.get("per_class")
    if jax.process_index() == 0:
        path = os.path.join(workdir, "summary.json")
        io.write_json_atomic(path, summary)
        summary["summary"] = path
        log(where_everything_is(summary))
    return summary


def where_everything_is(summary: dict[str, Any]) -> str:
    """The closing lines of a run: every output's location and the mIoU figures."""
    lines = ["== outputs"]
    if "label" in summary:
        s = summary["label"]
        lines.append(f"   pseudo labels   {s['labels_dir']}  ({s['labelled_total']} images, {s['failed_total']} "
                     f"unreadable)")
        if s.get("report"):
            lines.append(f"   label report    {s['report']}")
        if s.get("miou") is not None:
            lines.append(f"   pseudo-label mIoU against ground truth: {s['miou']:.2f} ({s['eval']})")
    if "train" in summary:
        t = summary["train"]
        lines.append(f"   checkpoints     {t.get('checkpoints')}  (best: {t.get('best_checkpoint')}"
                     + (f", best EMA: {t.get('best_ema_checkpoint')}" if "best_ema_checkpoint" in t else "") + ")")
        lines.append(f"   metrics         {t.get('train_metrics')}, {t.get('eval_metrics')}")
        plots = t.get("plots") or {}
        if plots:
            lines.append(f"   plots           {', '.join(plots.values())}")
        lines.append(f"   TensorBoard     tensorboard --logdir {t.get('tensorboard')}")
    if "eval" in summary:
        e = summary["eval"]
        lines.append(f"   evaluation      {e.get('output')}")
    final, best = summary.get("final_miou"), summary.get("best_miou")
    if final is not None or best is not None or "eval" in summary:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        evaluated = ""
        if "eval" in summary:
            e = summary["eval"]
            which = "best" if e.get("is_best", True) else "latest"
            teacher = "the EMA teacher of the " if e.get("weights") == "ema" else ""
            evaluated = (f", evaluated {teacher}{which}{'-EMA' if teacher else ''} checkpoint (step "
                         f"{e.get('checkpoint_step')}) {fmt(e.get('miou'))}")
        ema = (f" (EMA: final {fmt(summary.get('final_miou_ema'))}, best {fmt(summary.get('best_ema_miou'))}, "
               f"UniMatch V2's result)" if "best_ema_miou" in summary else "")
        lines.append(f"   mIoU: final {fmt(final)}, best {fmt(best)}" + ema + evaluated)
    lines.append(f"   summary         {summary.get('summary', os.path.join(summary['workdir'], 'summary.json'))}")
    return "\n".join(lines)

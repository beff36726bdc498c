"""The training loop: config -> a trained model, its evaluations, checkpoints, logs and plots.

Either trainer family (``model.family``) runs through the same set-up, resume, step and hooks:
``deeplab`` (UniMatch V1's DeepLabV3+, ``zsp_jax.train.step``) and ``unimatch_v2`` (UniMatch V2's DINOv2 +
DPT, ``zsp_jax.train.v2_step``, whose state carries the EMA teacher). For ``unimatch_v2`` every evaluation
point evaluates the student and the EMA teacher (both logged: ``eval/miou`` and ``eval/miou_ema``), the
run's record holds both bests (``best_step`` / ``best_miou`` for the student, ``best_ema_step`` /
``best_ema_miou`` for the teacher; V2's rule: a tie goes to the later evaluation), both best checkpoints
are protected from deletion, and the summary's ``result_miou`` is the EMA's best (what V2 reports).

``train(config)`` reads as set-up, the jitted step and a short loop (big_vision's ``train.py``):

1. set-up: the input pipeline, the mesh and model, the optimiser and state, the checkpoints;
2. resume: the newest checkpoint that restores (a damaged one is moved aside:
   ``zsp_jax.train.checkpointing``) gives the state, the input position and the run's record
   (best mIoU and its step, evaluation history); a finished run returns its summary;
3. the step: ``zsp_jax.train.step`` under ``jax.jit`` (state donated), compiled ahead of time so
   its memory estimate, whether that fits the device (and, if not, which fields shrink it) and
   its FLOP count are printed before the first step;
4. the loop, with three hooks at the steps the config names: metrics (fetched every
   ``train.log_every`` steps, stopping with ``TrainingDiverged`` on a non-finite loss),
   evaluation (``eval.every_epochs`` / ``eval.every_steps`` / the end) and checkpoints
   (``checkpoint.every_steps``, epoch ends, evaluations, the end).

Outputs in ``config.workdir``: ``checkpoints/<step>/`` (the last ``checkpoint.keep`` and the best by
mIoU (V2: both bests), which survive any number of kills), ``train_metrics.jsonl``, ``eval_metrics.jsonl``,
``tensorboard/``, ``plots/{loss,miou}.png``, ``bad_input.json``, ``train_config.json`` (the config it
trained with, rewritten on each resumed session) and ``train_summary.json`` (what ``train`` returns).

The schedule is part of the run: resuming with another ``train.epochs``, ``train.max_steps``,
``train.batch_size`` or ``data.split`` is refused, naming the field (the poly learning rate of
every step already taken would differ); train longer in a new ``config.workdir``. So is resuming with
another model (``model.family``, ``model.backbone`` / ``model.encoder``, ``data.num_classes``), before any
checkpoint is read (its arrays would not fit, and would be taken for damage).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from zsp_jax.data import bad_input
from zsp_jax.data import config as data_config
from zsp_jax.data import inputs as data_inputs
from zsp_jax.train import checkpointing, logs
from zsp_jax.train import config as train_config
from zsp_jax.train import state as state_lib
from zsp_jax.train import step as step_lib
from zsp_jax.train import v2_step
from zsp_jax.train.setup import configure_jax, host_value, is_main_process, make_evaluator, say, setup_model
from zsp_jax.utils import bench, io, memory

SUMMARY = "train_summary.json"
CONFIG_FILE = "train_config.json"
CHECKPOINTS = "checkpoints"
SCHEDULE_FIELDS = ("train.epochs", "train.max_steps", "train.batch_size", "data.split")


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN or infinite; ``step`` (1-based) and ``term`` name where."""

    def __init__(self, step: int, term: str, value: float, last_checkpoint: str | None):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(f"training diverged at step {step}: {term} = {value} (not finite); the run stopped, "
                         f"{where}. Lower config.train.lr or check the inputs of that step.")
        self.step, self.term, self.value, self.last_checkpoint = step, term, value, last_checkpoint


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    section, key = dotted.split(".")
    return config[section].get(key)


def model_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that fix the shapes of a run's state (kept in every checkpoint)."""
    fam = state_lib.family(config)
    which = "model.encoder" if fam == "unimatch_v2" else "model.backbone"
    return {"model.family": fam, which: _field(config, which), "data.num_classes": config.data.num_classes}


def check_same_model(meta: dict[str, Any], config: ml_collections.ConfigDict, checkpoint: str) -> None:
    """Raises ``ValueError`` naming each model field that differs from the run in ``checkpoint``."""
    recorded = dict(meta.get("model") or {"model.family": "deeplab"})
    now = model_record(config)
    changed = [f"{name}={now[name]!r} (the run used {recorded[name]!r})" for name in now
               if name in recorded and recorded[name] != now[name]]
    if changed:
        raise ValueError(f"config field {', '.join(changed)}: the run in {os.path.dirname(checkpoint)} trained another "
                         f"model, whose checkpoints this one cannot resume. Use a new config.workdir (or the run's "
                         f"values)")


# The share of a device's memory the train step's XLA estimate may take before the trainer warns: the
# estimate leaves out the input pipeline's device buffers and the allocator's fragmentation.
TRAIN_MEMORY_FRACTION = 0.9


def memory_advice(config: ml_collections.ConfigDict) -> str:
    """The fields that shrink the train step's memory, those not already at their smallest."""
    t = config.train
    ways = [f"a smaller train.batch_size (now {t.batch_size}) or train.crop_size (now {t.crop_size})"]
    if config.model.dtype != "bfloat16":
        ways.append("model.dtype=bfloat16 (bf16 compute, fp32 parameters)")
    ways.append(f"a larger train.fsdp (now {t.fsdp}: parameters and optimiser state sharded over that many devices)")
    return "try " + ", ".join(ways)


def check_same_processes(meta: dict[str, Any], checkpoint: str) -> None:
    """Raises ``ValueError`` when the run in ``checkpoint`` was written by another number of processes: each
    process's input position is its own file, so another count cannot resume it (Orbax would restore the
    arrays, Grain not the input)."""
    recorded = meta.get("processes")
    if recorded is not None and recorded != jax.process_count():
        raise ValueError(f"the run in {os.path.dirname(checkpoint)} was written by {recorded} process(es) and this "
                         f"is {jax.process_count()}: its input positions are per process. Resume it with "
                         f"{recorded} process(es) (docs/multi_host.md), or use a new config.workdir")


def is_v2(config: ml_collections.ConfigDict) -> bool:
    return state_lib.family(config) == "unimatch_v2"


def loss_terms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The family's loss terms, in the order a divergence report looks for a non-finite one."""
    return v2_step.LOSS_TERMS if is_v2(config) else step_lib.LOSS_TERMS


def make_step(config: ml_collections.ConfigDict, graphdef: Any, tx: Any, schedule: Any) -> Any:
    """The family's train step ``(state, host batch, rng) -> (state, metrics)`` (not yet jitted)."""
    options = train_config.step_options(config)
    if is_v2(config):
        return v2_step.make_train_step_v2(graphdef, tx, options, schedule)
    return step_lib.make_train_step(graphdef, tx, options, schedule)


def protected_steps(meta: dict[str, Any]) -> set[int]:
    """The best checkpoints a run keeps whatever ``checkpoint.keep`` says: the student's, and V2's EMA's."""
    return {s for s in (meta.get("best_step"), meta.get("best_ema_step")) if s is not None}


def schedule_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that fix a run's steps and learning rates (kept in every checkpoint)."""
    return {name: _field(config, name) for name in SCHEDULE_FIELDS}


def check_same_schedule(meta: dict[str, Any], config: ml_collections.ConfigDict, checkpoint: str,
                        total: int | None = None) -> None:
    """Raises ``ValueError`` naming each field whose value differs from the run in ``checkpoint``."""
    recorded = meta.get("schedule") or {}
    now = schedule_record(config)
    changed = [f"{name}={now[name]!r} (the run used {recorded[name]!r})" for name in SCHEDULE_FIELDS
               if name in recorded and recorded[name] != now[name]]
    if not changed and total is not None and meta.get("total_steps") not in (None, total):
        changed = [f"a schedule of {total} steps (the run has {meta['total_steps']}: the dataset or split changed)"]
    if changed:
        finished = "finished" if meta.get("finished") else "was stopped"
        raise ValueError(f"config field {', '.join(changed)}: the run in {os.path.dirname(checkpoint)} {finished} "
                         f"with another schedule, and resuming it with this one would change the learning rate "
                         f"of the steps already taken. Use a new config.workdir (or the run's values)")


def _paths(workdir: str, checkpoints: checkpointing.Checkpointer, meta: dict[str, Any]) -> dict[str, Any]:
    best, steps = meta.get("best_step"), checkpoints.all_steps()
    extra = {}
    if meta.get("family") == "unimatch_v2":
        best_ema = meta.get("best_ema_step")
        extra["best_ema_checkpoint"] = checkpoints.path(best_ema) if best_ema is not None and best_ema in steps else None
    return {"workdir": workdir, "checkpoints": checkpoints.directory, **extra,
            "best_checkpoint": checkpoints.path(best) if best is not None and best in steps else None,
            "latest_checkpoint": checkpoints.path(steps[-1]) if steps else None,
            "train_metrics": os.path.join(workdir, logs.TRAIN_LOG), "eval_metrics": os.path.join(workdir, logs.EVAL_LOG),
            "tensorboard": os.path.join(workdir, logs.TB_DIR), "bad_input_report": os.path.join(workdir, "bad_input.json"),
            "plots": {k: os.path.join(workdir, logs.PLOTS_DIR, f"{k}.png") for k in ("loss", "miou")}}


def _summary(config: ml_collections.ConfigDict, meta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The run's summary. ``result_miou`` is the figure the method reports: the best mIoU, for ``unimatch_v2``
    the EMA teacher's best (``result_weights`` says which: ``student`` or ``ema``)."""
    evals, total = meta.get("evals", []), meta["total_steps"]
    final = evals[-1] if evals and evals[-1]["step"] == total else None
    out = {"family": state_lib.family(config), "mode": config.train.mode,
           "enhanced": config.train.enhanced if config.train.mode == "zsp" else None,
           "steps": total, "steps_per_epoch": meta["steps_per_epoch"], "epochs": total / meta["steps_per_epoch"],
           "final_miou": final["miou"] if final else None, "best_miou": meta.get("best_miou"),
           "best_step": meta.get("best_step"), "eval_mode": config.eval.mode, "evals": evals,
           "final_eval": meta.get("last_eval") if final else None, "seconds_this_session": round(seconds, 1),
           "result_miou": meta.get("best_miou"), "result_weights": "student"}
    if is_v2(config):
        out.update(final_miou_ema=final.get("miou_ema") if final else None, best_ema_miou=meta.get("best_ema_miou"),
                   best_ema_step=meta.get("best_ema_step"), final_eval_ema=meta.get("last_eval_ema") if final else None,
                   result_miou=meta.get("best_ema_miou"), result_weights="ema")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def describe_bests(summary_or_meta: dict[str, Any]) -> str:
    """``best mIoU 41.20 (step 800)``, for V2 with ``, EMA 42.10 (step 900)``."""
    m = summary_or_meta
    text = f"best mIoU {_fmt(m.get('best_miou'))} (step {m.get('best_step')})"
    if "best_ema_miou" in m:
        text += f", EMA {_fmt(m.get('best_ema_miou'))} (step {m.get('best_ema_step')})"
    return text


def _finished(config: ml_collections.ConfigDict, workdir: str, checkpoints: checkpointing.Checkpointer,
              restored: checkpointing.Restored) -> dict[str, Any]:
    """The summary of a run that finished before (rewritten if a kill came before it was)."""
    check_same_model(restored.meta, config, checkpoints.path(restored.step))
    check_same_schedule(restored.meta, config, checkpoints.path(restored.step))
    summary = dict(restored.meta["summary"])
    summary.update(_paths(workdir, checkpoints, restored.meta))
    say(f"train: already finished ({restored.step} steps; {describe_bests(summary)}); summary "
        f"{os.path.join(workdir, SUMMARY)}")
    if is_main_process():
        io.write_json_atomic(os.path.join(workdir, SUMMARY), summary)
    return summary


class _MetricsLog:
    """Fetches the pending steps' metrics every ``log_every`` steps (one device->host copy for several
    steps), writes them to the run log and stops the run at the first non-finite one."""

    def __init__(self, run_log: logs.RunLog, bar: tqdm.tqdm, *, images_per_step: int, steps_per_epoch: int,
                 last_checkpoint_before: Any, loss_terms: tuple[str, ...] = step_lib.LOSS_TERMS):
        self.run_log, self.bar = run_log, bar
        self.loss_terms = loss_terms
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.last_checkpoint_before = last_checkpoint_before
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.window_start = time.perf_counter()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))
        self.bar.update(1)

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = host_value([m for _, m in self.pending])
        elapsed = time.perf_counter() - self.window_start
        rate = self.images_per_step * len(self.pending) / elapsed if elapsed > 0 else float("nan")
        for (step, _), values in zip(self.pending, fetched):
            if not values["finite"]:
                bad = next((k for k in self.loss_terms if k in values and not math.isfinite(float(values[k]))),
                           "grad_norm")
                self.pending.clear()
                raise TrainingDiverged(step, bad, float(values[bad]), self.last_checkpoint_before(step))
            scalars = {k: float(v) for k, v in values.items() if k != "finite"}
            scalars["images_per_s"] = rate
            scalars["epoch"] = (step - 1) // self.steps_per_epoch + 1
            self.run_log.train(step, scalars)
        self.bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4f}", img_s=f"{rate:.1f}", refresh=False)
        self.pending.clear()
        self.window_start = time.perf_counter()


def _check_disk_space(workdir: str, host_state: Any, keep: int) -> None:
    """Refuses to start when the work directory cannot hold the checkpoints the run will keep (the last
    ``keep``, the best and one being written), naming the fields to change."""
    import shutil

    need = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state)) * (keep + 2)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise ValueError(f"config.workdir={workdir}: {free / 2**30:.2f} GiB free, but the checkpoints need about "
                         f"{need / 2**30:.2f} GiB (checkpoint.keep={keep}, the best and one being written): free "
                         f"some space, lower checkpoint.keep, or use another config.workdir")


_LAST_EVAL_KEYS = ("miou", "miou_present", "pixel_accuracy", "per_class")


def _record_eval(meta: dict[str, Any], result: dict[str, Any], step: int, epoch: int,
                 ema: dict[str, Any] | None = None) -> float:
    """Adds an evaluation (and V2's EMA evaluation) to the run's record (best mIoU and its step, for each);
    returns the student's mIoU.

    A better mIoU replaces the best; V2 also lets an equal one replace it (``unimatch_v2.py``: ``best_epoch``
    is the last epoch whose mIoU equals the best), V1 keeps the first.
    """
    def better(new: float, best: float | None) -> bool:
        return best is None or new > best or (ema is not None and new == best)

    miou = result["miou"]
    entry = {"step": step, "epoch": epoch, "miou": miou}
    if better(miou, meta["best_miou"]):
        meta["best_miou"], meta["best_step"] = miou, step
    meta["last_eval"] = {k: result[k] for k in _LAST_EVAL_KEYS}
    if ema is not None:
        entry["miou_ema"] = ema["miou"]
        if better(ema["miou"], meta.get("best_ema_miou")):
            meta["best_ema_miou"], meta["best_ema_step"] = ema["miou"], step
        meta["last_eval_ema"] = {k: ema[k] for k in _LAST_EVAL_KEYS}
    meta["evals"].append(entry)
    return miou


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """One training run of ``config`` (see the module docstring); returns its summary."""
    c = config.checkpoint
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    os.makedirs(workdir, exist_ok=True)
    configure_jax(config, workdir)
    checkpoints = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS), keep=c.keep,
                                             async_save=c.async_save)
    resources: list[Any] = [checkpoints]
    try:
        return _train(config, workdir, checkpoints, resources)
    finally:
        for resource in reversed(resources):  # pipeline workers, logs and checkpoint writes end on every path
            try:
                resource.close()
            except Exception:  # noqa: BLE001 - never hide the error that got us here
                pass


def _train(config: ml_collections.ConfigDict, workdir: str, checkpoints: checkpointing.Checkpointer,
           resources: list[Any]) -> dict[str, Any]:
    t, e, c = config.train, config.eval, config.checkpoint
    t_start = time.perf_counter()
    # A finished run is recognised from its record alone, before anything is built.
    record = checkpoints.restore_latest(None, None, say=say)
    if record is not None:  # what cannot resume is refused here, before anything is built or moved aside
        check_same_model(record.meta, config, checkpoints.path(record.step))
        if not record.meta.get("finished"):  # a finished run is only reported (_finished checks its schedule)
            check_same_processes(record.meta, checkpoints.path(record.step))
            check_same_schedule(record.meta, config, checkpoints.path(record.step))
    if record is not None and record.meta.get("finished"):
        return _finished(config, workdir, checkpoints, record)

    # ---------------------------------------------------------------- input
    if is_main_process():
        io.write_text_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2) + "\n")
    if t.mode == "zsp":
        data_config.validate_pseudo_labels(config)
    sources = data_inputs.training_sources(config, pseudo_labels=config.data.pseudo_labels if t.mode == "zsp" else "")
    problems = list(sources.problems)
    pipeline = data_inputs.make_train_pipeline(config, sources, with_unlabeled=t.mode != "supervised")
    total = pipeline.steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    batches = iter(pipeline)
    if hasattr(batches, "close"):
        resources.append(batches)

    # ---------------------------------------------------------------- model, optimiser, state
    setup = setup_model(config, workdir)
    mesh = setup.placement.mesh
    if t.batch_size % mesh.size:
        raise ValueError(f"config field train.batch_size={t.batch_size}: must be a multiple of the number of devices "
                         f"({mesh.size}); set train.num_devices to use fewer")
    tx, schedule = state_lib.make_optimizer(config, setup.params, total)
    host_state = state_lib.init_state(setup.params, setup.batch_stats, tx, family=setup.family)
    shardings = state_lib.state_shardings(host_state, mesh)
    replicated = NamedSharding(mesh, P())
    _check_disk_space(workdir, host_state, c.keep)
    state = state_lib.place(host_state, shardings)
    rng = jax.random.wrap_key_data(state_lib.place(jax.random.key_data(jax.random.key(config.seed)), replicated))
    meta: dict[str, Any] = {"step": 0, "epoch": 0, "best_miou": None, "best_step": None, "evals": [],
                            "finished": False, "mode": t.mode, "enhanced": t.enhanced, "total_steps": total,
                            "steps_per_epoch": pipeline.steps_per_epoch, "schedule": schedule_record(config),
                            "family": setup.family, "model": model_record(config),
                            "processes": jax.process_count()}
    if is_v2(config):
        meta.update(best_ema_miou=None, best_ema_step=None)

    # ---------------------------------------------------------------- resume
    if record is not None:
        abstract = checkpointing.abstract_tree(host_state, rng, shardings, replicated)
        restored = checkpoints.restore_latest(abstract, batches, say=say)
        if restored is not None:
            check_same_schedule(restored.meta, config, checkpoints.path(restored.step), total)
            state, rng = checkpointing.state_from_tree(restored.tree)
            meta.update(restored.meta)
            meta.update(schedule=schedule_record(config), family=setup.family, model=model_record(config),
                        processes=jax.process_count())
    checkpoints.protect(protected_steps(meta))
    start = int(host_value(state.step))

    # ---------------------------------------------------------------- hooks: logs, evaluation
    run_log = logs.RunLog(workdir, enabled=is_main_process(), resume_step=start)
    resources.append(run_log)
    evaluator = None
    if e.every_epochs or e.every_steps or e.at_end:
        evaluator, eval_sources = make_evaluator(config, setup)
        problems += eval_sources.problems
    if is_main_process():
        bad_input.write_report(os.path.join(workdir, "bad_input.json"), problems,
                               f"split {config.data.split} and val.txt of {config.data.dataset}")
    say(f"model: {setup.model_description}; compute {config.model.dtype}, parameters fp32")
    say(f"data: {sources.origin}")
    say(f"input: {pipeline.describe()}; {len(problems)} bad input file(s) left out")
    say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); training {t.mode}" + (f" ({t.enhanced})" if t.mode == "zsp" else "")
        + f", {total} steps ({pipeline.steps_per_epoch} per epoch)"
        + (f", resuming at step {start}" if start else "")
        + (f" (so far: {describe_bests(meta)})" if start and meta["best_miou"] is not None else ""))

    # ---------------------------------------------------------------- the step
    step_fn = jax.jit(make_step(config, setup.graphdef, tx, schedule), donate_argnums=(0,),
                      out_shardings=(shardings, replicated))
    host_batch = next(batches) if start < total else None
    compiled = None
    if host_batch is not None:
        batch = state_lib.global_batch(host_batch, setup.placement.batch)
        t_compile = time.perf_counter()
        compiled = step_fn.lower(state, batch, rng).compile()
        flops = bench.program_flops(compiled)
        say(f"train step compiled in {time.perf_counter() - t_compile:.1f} s: {bench.memory_summary(compiled)}; "
            + (f"{flops / 1e9:.1f} GFLOP per step per device (XLA estimate)" if flops else "no FLOP estimate"))
        say(memory.describe_fit("the train step", memory.estimated_bytes(compiled),
                                 memory.MemoryBudget.of_device(mesh.devices.flat[0], fraction=TRAIN_MEMORY_FRACTION,
                                                                field="train.batch_size"),
                                 memory_advice(config)))

    # ---------------------------------------------------------------- the loop
    bar = tqdm.tqdm(total=total, initial=start, desc=f"train {t.mode}", unit="step", dynamic_ncols=True,
                    disable=not is_main_process())
    resources.append(bar)

    def last_checkpoint_before(step: int) -> str | None:
        checkpoints.wait()
        good = [s for s in checkpoints.all_steps() if s < step]
        return checkpoints.path(good[-1]) if good else None

    metrics_log = _MetricsLog(run_log, bar, images_per_step=pipeline.global_batch_size * (1 if t.mode == "supervised"
                                                                                             else 2),
                              steps_per_epoch=pipeline.steps_per_epoch, last_checkpoint_before=last_checkpoint_before,
                              loss_terms=loss_terms(config))
    for done in range(start + 1, total + 1):
        if host_batch is None:
            batch = state_lib.global_batch(next(batches), setup.placement.batch)
        host_batch = None
        state, metrics = compiled(state, batch, rng)
        metrics_log.add(done, metrics)
        epoch_end = done % pipeline.steps_per_epoch == 0
        epoch = (done - 1) // pipeline.steps_per_epoch + 1
        do_eval = evaluator is not None and (
            (epoch_end and e.every_epochs and epoch % e.every_epochs == 0)
            or (e.every_steps and done % e.every_steps == 0) or (done == total and e.at_end))
        do_save = (c.every_steps and done % c.every_steps == 0) or epoch_end or done == total or do_eval
        if len(metrics_log.pending) >= t.log_every or do_eval or do_save:
            metrics_log.flush()
        if do_eval:
            # V2's segmenter has no BatchNorm statistics: the (empty) ones of the set-up stand in
            stats = state.batch_stats if hasattr(state, "batch_stats") else setup.batch_stats
            result = evaluator.evaluate(state.params, stats)
            result["epoch"], result["step"] = epoch, done
            ema = evaluator.evaluate(state.ema_params, stats) if is_v2(config) else None
            miou = _record_eval(meta, result, done, epoch, ema)
            run_log.eval(done, result, ema)
            run_log.plot()
            seconds = result["seconds"] + (ema["seconds"] if ema else 0.0)
            say(f"step {done} (epoch {epoch}): mIoU {miou:.2f}" + (f", EMA {ema['miou']:.2f}" if ema else "")
                + f" ({describe_bests(meta)}), {seconds:.1f} s")
        if do_save:
            meta.update(step=done, epoch=epoch, finished=done == total)
            if done == total:
                meta["summary"] = _summary(config, meta, time.perf_counter() - t_start)
            checkpoints.protect(protected_steps(meta))
            checkpoints.save(done, state, rng, batches, meta)
    metrics_log.flush()
    bar.close()
    checkpoints.wait()
    plots = run_log.plot()
    summary = dict(meta.get("summary") or _summary(config, meta, time.perf_counter() - t_start))
    summary["seconds_this_session"] = round(time.perf_counter() - t_start, 1)
    summary.update(_paths(workdir, checkpoints, meta))
    summary["plots"] = plots or summary["plots"]
    if is_main_process():
        io.write_json_atomic(os.path.join(workdir, SUMMARY), summary)
    final = _fmt(summary.get("final_miou")) + (f", EMA {_fmt(summary.get('final_miou_ema'))}"
                                               if "final_miou_ema" in summary else "")
    result = (f"; result (the EMA's best, as UniMatch V2 reports): {_fmt(summary.get('result_miou'))}"
              if summary.get("result_weights") == "ema" else "")
    say(f"train: done, {total} steps; final mIoU {final}; {describe_bests(summary)}{result}; summary "
        f"{os.path.join(workdir, SUMMARY)}")
    return summary

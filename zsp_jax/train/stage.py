"""The training stage: config -> a trained DeepLabV3+, its evaluations, checkpoints, logs and plots.

``run(config)`` trains ``config.train.mode`` (supervised / unimatch / zsp) and evaluates every
``eval.every_epochs`` epochs and/or ``eval.every_steps`` steps and at the end, in
``config.workdir``:

* ``checkpoints/<step>/`` (Orbax: state, Grain iterator position, metadata): every
  ``checkpoint.every_steps`` steps, at every epoch end and evaluation; the last
  ``checkpoint.keep`` and the best by mIoU are kept. A run finds them and resumes by itself,
  exactly where it stopped (same parameters as an uninterrupted run); a finished run returns
  its summary without training again.
* ``train_metrics.jsonl``, ``eval_metrics.jsonl``, ``tensorboard/``, ``plots/{loss,miou}.png``,
  ``bad_input.json``, ``train_config.json`` (the config it trained with) and ``train_summary.json``
  (what ``run`` returns).

Before the first step it prints the model, the input, and the ahead-of-time compiled step's
memory estimate and XLA FLOP count. A non-finite loss stops the run with ``TrainingDiverged``
naming the step and the loss term; the checkpoints on disk predate it.

Enhanced-label option C (``train.enhanced="relabel"``) is two runs: ``zsp_jax.train.relabel``.

``evaluate(config, checkpoint)`` evaluates a run's checkpoint (or a converted or PyTorch
UniMatch checkpoint file) on the validation list: the ``eval`` stage of ``zsp_jax.main`` and
``python -m zsp_jax.evaluate``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zsp_jax.data import bad_input, classes
from zsp_jax.data import config as data_config
from zsp_jax.data import stage as data_stage
from zsp_jax.train import checkpoint as ckpt_lib
from zsp_jax.train import config as train_config
from zsp_jax.train import evaluation, logs
from zsp_jax.train import state as state_lib
from zsp_jax.train import step as step_lib
from zsp_jax.utils import bench, io

log = logging.getLogger(__name__)

SUMMARY = "train_summary.json"
CONFIG = "train_config.json"  # the config the run trained with (rewritten on each resumed session)
CHECKPOINTS = "checkpoints"


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN or infinite; ``step`` (1-based) and ``term`` name where."""

    def __init__(self, step: int, term: str, value: float, last_checkpoint: str | None):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(f"training diverged at step {step}: {term} = {value} (not finite); the run stopped, "
                         f"{where}. Lower config.train.lr or check the inputs of that step.")
        self.step, self.term, self.value, self.last_checkpoint = step, term, value, last_checkpoint


def _main_process() -> bool:
    return jax.process_index() == 0


def _host(x: Any) -> Any:
    """A replicated (possibly multi-process) array's value on this host."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), x)


def _say(text: str) -> None:
    if _main_process():
        tqdm.tqdm.write(text)


def configure_jax(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Matmul precision (``train.matmul_precision``) and the persistent compilation cache
    (``train.compilation_cache``: ``<workdir>/jax_cache``, so a resumed run does not recompile)."""
    t = config.train
    if t.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", t.matmul_precision)
    if t.compilation_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@dataclasses.dataclass
class Setup:
    """What a training or evaluation run builds from the config."""

    placement: state_lib.Placement
    graphdef: nnx.GraphDef
    params: Any
    batch_stats: Any
    model_description: str


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
        _say(f"train.batch_size={batch} does not split over {jax.device_count()} devices: using {n} "
             f"(set train.num_devices, or a batch size that is a multiple of the device count)")
    if n % processes or n // processes > per_process:
        raise ValueError(f"config field train.num_devices={n}: expected a multiple of the process count "
                         f"({processes}) up to {per_process * processes}")
    k = n // processes
    by_process: dict[int, list[Any]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [d for p in sorted(by_process) for d in by_process[p][:k]]


def setup_model(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """The mesh, the model (random or from ``model.pretrained``) and its split state for ``config``."""
    mesh = state_lib.make_mesh(config.train.fsdp, devices(config))
    model, description = state_lib.build_model(config, workdir=workdir)
    graphdef, params, stats = state_lib.split_model(model)
    placement = state_lib.Placement(mesh, None, state_lib.batch_sharding(mesh))
    return Setup(placement, graphdef, params, stats, description)


def make_evaluator(config: ml_collections.ConfigDict, setup: Setup) -> tuple[evaluation.Evaluator, Any]:
    """The validation-set evaluator for ``config.eval`` and the evaluation sources (with their problems)."""
    srcs = data_stage.eval_sources(config)
    e = config.eval
    ev = evaluation.Evaluator(setup.graphdef, srcs.source, srcs.sizes, setup.placement, mode=e.mode,
                              crop=config.train.crop_size, bucket=e.bucket, batch_size=e.batch_size,
                              num_classes=config.data.num_classes,
                              class_names=classes.CLASSES.get(config.data.dataset), threads=e.threads)
    return ev, srcs


def _summary_path(workdir: str) -> str:
    return os.path.join(workdir, SUMMARY)


def _paths(workdir: str, checkpoints: ckpt_lib.Checkpointer, meta: dict[str, Any]) -> dict[str, Any]:
    best = meta.get("best_step")
    latest = checkpoints.latest_step()
    return {"workdir": workdir, "checkpoints": checkpoints.directory,
            "best_checkpoint": checkpoints.path(best) if best is not None and best in checkpoints.all_steps() else None,
            "latest_checkpoint": checkpoints.path(latest) if latest is not None else None,
            "train_metrics": os.path.join(workdir, logs.TRAIN_LOG), "eval_metrics": os.path.join(workdir, logs.EVAL_LOG),
            "tensorboard": os.path.join(workdir, logs.TB_DIR), "bad_input_report": os.path.join(workdir, "bad_input.json"),
            "plots": {k: os.path.join(workdir, logs.PLOTS_DIR, f"{k}.png") for k in ("loss", "miou")}}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains (or resumes, or returns the finished run's summary); see the module docstring."""
    train_config.validate(config)
    if config.train.mode == "zsp" and config.train.enhanced == "relabel":
        from zsp_jax.train import relabel

        return relabel.run_two_stage(config)
    return train(config)


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """One training run of ``config`` (``run`` without the option-C dispatch)."""
    t, e, c = config.train, config.eval, config.checkpoint
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    os.makedirs(workdir, exist_ok=True)
    configure_jax(config, workdir)
    checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINTS), keep=c.keep, keep_best=c.keep_best,
                                        async_save=c.async_save)
    latest = checkpoints.latest_step()
    if latest is not None:
        meta = checkpoints.read_meta(latest)
        if meta.get("finished"):
            summary = meta["summary"]
            _say(f"train: already finished ({latest} steps; best mIoU {summary.get('best_miou')}); "
                 f"summary {_summary_path(workdir)}")
            checkpoints.close()
            if _main_process() and not os.path.isfile(_summary_path(workdir)):  # killed before writing it
                io.write_json_atomic(_summary_path(workdir), summary)
            return summary
    t_start = time.perf_counter()
    if _main_process():
        io.write_text_atomic(os.path.join(workdir, CONFIG), config.to_json_best_effort(indent=2) + "\n")
    options = train_config.step_options(config)
    if t.mode == "zsp":
        data_config.validate_pseudo_labels(config)
    pseudo = config.data.pseudo_labels if t.mode == "zsp" else ""
    srcs = data_stage.training_sources(config, pseudo_labels=pseudo)
    problems = list(srcs.problems)
    pipe = data_stage.make_train_pipeline(config, srcs, with_unlabeled=t.mode != "supervised")
    total = pipe.steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    setup = setup_model(config, workdir)
    if t.batch_size % setup.placement.mesh.size:
        raise ValueError(f"config field train.batch_size={t.batch_size}: must be a multiple of the number of devices "
                         f"({setup.placement.mesh.size}); set train.num_devices to use fewer")
    tx, schedule = state_lib.make_optimizer(config, setup.params, total)
    host_state = state_lib.init_state(setup.params, setup.batch_stats, tx)
    mesh = setup.placement.mesh
    shardings = state_lib.state_shardings(host_state, mesh)
    replicated = NamedSharding(mesh, P())
    state = state_lib.place(host_state, shardings)
    rng = jax.random.wrap_key_data(state_lib.place(jax.random.key_data(jax.random.key(config.seed)), replicated))
    it = iter(pipe)
    meta: dict[str, Any] = {"step": 0, "epoch": 0, "best_miou": None, "best_step": None, "evals": [],
                            "finished": False, "mode": t.mode, "enhanced": t.enhanced, "total_steps": total,
                            "steps_per_epoch": pipe.steps_per_epoch}
    if latest is not None:
        abstract = ckpt_lib.abstract_tree(host_state, rng, shardings, replicated)
        tree, meta = checkpoints.restore(latest, abstract, it)
        state, rng = ckpt_lib.state_from_tree(tree)
        if meta.get("total_steps") != total:
            raise ValueError(f"{checkpoints.path(latest)} belongs to a run of {meta.get('total_steps')} steps, this "
                             f"config asks for {total}: use another config.workdir, or the same train.epochs / "
                             f"train.max_steps / train.batch_size")
    start = int(_host(state.step))
    run_log = logs.RunLog(workdir, enabled=_main_process(), resume_step=start)
    evaluator = None
    if e.every_epochs or e.every_steps or e.at_end:
        evaluator, eval_srcs = make_evaluator(config, setup)
        problems += eval_srcs.problems
    if _main_process():
        bad_input.write_report(os.path.join(workdir, "bad_input.json"), problems,
                               f"split {config.data.split} and val.txt of {config.data.dataset}")
    _say(f"model: {setup.model_description}; compute {config.model.dtype}, parameters fp32")
    _say(f"data: {srcs.origin}")
    _say(f"input: {pipe.describe()}; {len(problems)} bad input file(s) left out")
    _say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
         f"{jax.process_count()} process(es); training {t.mode}" + (f" ({t.enhanced})" if t.mode == "zsp" else "")
         + f", {total} steps ({pipe.steps_per_epoch} per epoch)"
         + (f", resuming at step {start}" if start else ""))

    step_fn = jax.jit(step_lib.make_train_step(setup.graphdef, tx, options, schedule), donate_argnums=(0,),
                      out_shardings=(shardings, replicated))
    if start >= total:
        host = None
    else:
        host = next(it)
    compiled = None
    if host is not None:
        batch = state_lib.global_batch(host, setup.placement.batch)
        t_compile = time.perf_counter()
        compiled = step_fn.lower(state, batch, rng).compile()
        flops = bench.program_flops(compiled)
        _say(f"train step compiled in {time.perf_counter() - t_compile:.1f} s: {bench.memory_summary(compiled)}; "
             + (f"{flops / 1e9:.1f} GFLOP per step per device (XLA estimate)" if flops else "no FLOP estimate"))

    images_per_step = pipe.global_batch_size * (1 if t.mode == "supervised" else 2)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    t_window, n_window = time.perf_counter(), 0
    bar = tqdm.tqdm(total=total, initial=start, desc=f"train {t.mode}", unit="step", dynamic_ncols=True,
                    disable=not _main_process())

    def flush() -> None:
        """Fetches the pending steps' metrics, stops on a non-finite one, logs them."""
        nonlocal t_window, n_window
        if not pending:
            return
        fetched = _host([m for _, m in pending])
        elapsed = time.perf_counter() - t_window
        rate = images_per_step * n_window / elapsed if elapsed > 0 else float("nan")
        for (done, _), m in zip(pending, fetched):
            if not m["finite"]:
                bad = next((k for k in step_lib.LOSS_TERMS if k in m and not math.isfinite(float(m[k]))), "grad_norm")
                pending.clear()
                bar.close()
                checkpoints.wait()
                good = [s for s in checkpoints.all_steps() if s < done]
                checkpoints.close()
                run_log.close()
                raise TrainingDiverged(done, bad, float(m[bad]), checkpoints.path(max(good)) if good else None)
            scalars = {k: float(v) for k, v in m.items() if k != "finite"}
            scalars["images_per_s"] = rate
            scalars["epoch"] = (done - 1) // pipe.steps_per_epoch + 1
            run_log.train(done, scalars)
        bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4f}", img_s=f"{rate:.1f}", refresh=False)
        pending.clear()
        t_window, n_window = time.perf_counter(), 0

    for i in range(start, total):
        if host is None:
            host = next(it)
            batch = state_lib.global_batch(host, setup.placement.batch)
        state, m = compiled(state, batch, rng)
        host = None
        done = i + 1
        pending.append((done, m))
        n_window += 1
        bar.update(1)
        epoch_end = done % pipe.steps_per_epoch == 0
        epoch = (done - 1) // pipe.steps_per_epoch + 1
        do_eval = evaluator is not None and (
            (epoch_end and e.every_epochs and epoch % e.every_epochs == 0)
            or (e.every_steps and done % e.every_steps == 0) or (done == total and e.at_end))
        do_save = (c.every_steps and done % c.every_steps == 0) or epoch_end or done == total or do_eval
        if len(pending) >= t.log_every or do_eval or do_save:
            flush()
        miou = None
        if do_eval:
            result = evaluator.evaluate(state.params, state.batch_stats)
            result["epoch"], result["step"] = epoch, done
            miou = result["miou"]
            run_log.eval(done, result)
            meta["evals"].append({"step": done, "epoch": epoch, "miou": miou})
            if meta["best_miou"] is None or miou > meta["best_miou"]:
                meta["best_miou"], meta["best_step"] = miou, done
            meta["last_eval"] = {k: result[k] for k in ("miou", "miou_present", "pixel_accuracy", "per_class")}
            run_log.plot()
            _say(f"step {done} (epoch {epoch}): mIoU {miou:.2f} (best {meta['best_miou']:.2f} at step "
                 f"{meta['best_step']}), {result['seconds']:.1f} s")
        if do_save:
            meta.update(step=done, epoch=epoch, finished=done == total)
            if done == total:
                meta["summary"] = _summary(config, workdir, checkpoints, meta, total, pipe,
                                           time.perf_counter() - t_start, final_step_saved=True)
            checkpoints.save(done, state, rng, it, meta, miou=miou)
    flush()
    bar.close()
    checkpoints.wait()
    plots = run_log.plot()
    run_log.close()
    summary = meta.get("summary") or _summary(config, workdir, checkpoints, meta, total, pipe,
                                              time.perf_counter() - t_start, final_step_saved=True)
    summary["plots"] = plots or summary["plots"]
    summary.update(_paths(workdir, checkpoints, meta))
    checkpoints.close()
    if _main_process():
        io.write_json_atomic(_summary_path(workdir), summary)
    final = summary.get("final_miou")
    _say(f"train: done, {total} steps; final mIoU {final if final is None else round(final, 2)}, best "
         f"{summary.get('best_miou') if summary.get('best_miou') is None else round(summary['best_miou'], 2)} "
         f"(step {summary.get('best_step')}); summary {_summary_path(workdir)}")
    return summary


def _summary(config: ml_collections.ConfigDict, workdir: str, checkpoints: ckpt_lib.Checkpointer,
             meta: dict[str, Any], total: int, pipe: Any, seconds: float, final_step_saved: bool) -> dict[str, Any]:
    evals = meta.get("evals", [])
    final = evals[-1] if evals and evals[-1]["step"] == total else None
    out = {"mode": config.train.mode, "enhanced": config.train.enhanced if config.train.mode == "zsp" else None,
           "steps": total, "steps_per_epoch": pipe.steps_per_epoch, "epochs": total / pipe.steps_per_epoch,
           "final_miou": final["miou"] if final else None, "best_miou": meta.get("best_miou"),
           "best_step": meta.get("best_step"), "eval_mode": config.eval.mode, "evals": evals,
           "final_eval": meta.get("last_eval") if final else None, "seconds_this_session": round(seconds, 1)}
    out.update(_paths(workdir, checkpoints, meta))
    if final_step_saved and out["latest_checkpoint"] is None:
        out["latest_checkpoint"] = checkpoints.path(total)
    if out["best_checkpoint"] is None and meta.get("best_step") is not None:
        out["best_checkpoint"] = checkpoints.path(meta["best_step"])
    return out


# ------------------------------------------------------------------------------------- evaluation


def load_weights(config: ml_collections.ConfigDict, setup: Setup, checkpoint: str) -> tuple[Any, Any, str]:
    """(params, batch_stats, description) from a run directory (its best checkpoint), a
    ``checkpoints/<step>`` directory, a converted ``.safetensors`` or a UniMatch ``.pth``."""
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isfile(path):  # a converted .safetensors or a UniMatch .pth (converted in memory)
        from zsp_jax.models.deeplab import convert

        model, report = convert.load_model(path, config=state_lib.model_config(config),
                                           dtype=state_lib.compute_dtype(config))
        if report.random_parts:
            raise ValueError(f"{path} holds only a backbone ({report.summary()}); evaluate a trained checkpoint")
        _, params, stats = state_lib.split_model(state_lib.strip_rng_streams(model))
        return params, stats, f"{path} ({report.summary()})"
    step = None
    directory = path
    if os.path.basename(path).isdigit() and os.path.isdir(path):  # <run>/checkpoints/<step>
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    elif os.path.isdir(os.path.join(path, CHECKPOINTS)):  # a run's workdir: its best checkpoint
        best = best_checkpoint(path)
        if best is None:
            raise FileNotFoundError(f"checkpoint {checkpoint}: {path}/{CHECKPOINTS} holds no checkpoint")
        directory, step = os.path.dirname(best), int(os.path.basename(best))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or directory (give a run's workdir, its "
                                f"checkpoints/<step> directory, a .safetensors or a UniMatch .pth)")
    shardings = state_lib.state_shardings((setup.params, setup.batch_stats), setup.placement.mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            (setup.params, setup.batch_stats), shardings)
    params, stats, step = ckpt_lib.restore_params(directory, step, *abstract)
    return params, stats, f"{directory}/{step}"


def best_checkpoint(workdir: str) -> str | None:
    """The best checkpoint of a finished or running training in ``workdir`` (by mIoU), else its latest."""
    checkpoints = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(checkpoints):
        return None
    c = ckpt_lib.Checkpointer(checkpoints)
    steps = c.all_steps()
    best = None
    if steps:
        meta = c.read_meta(max(steps))
        best = meta.get("best_step") if meta.get("best_step") in steps else max(steps)
    c.close()
    return None if best is None else os.path.join(checkpoints, str(best))


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
    os.makedirs(workdir, exist_ok=True)
    configure_jax(config, workdir)
    if checkpoint is None:
        checkpoint = best_checkpoint(workdir)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/{CHECKPOINTS}: train first, or give --checkpoint")
    setup = setup_model(config, workdir)
    params, stats, description = load_weights(config, setup, checkpoint)
    shardings = state_lib.state_shardings((params, stats), setup.placement.mesh)
    params, stats = state_lib.place((params, stats), shardings)
    evaluator, srcs = make_evaluator(config, setup)
    _say(f"evaluating {description} on {len(srcs.sizes)} images ({config.eval.mode}, {len(evaluator.canvases)} "
         f"canvas shape(s)); {len(srcs.problems)} bad input file(s) left out")
    result = evaluator.evaluate(params, stats)
    result["checkpoint"] = description
    output = output or os.path.join(workdir, f"eval_{config.eval.mode}.json")
    result["output"] = output
    if _main_process():
        io.write_json_atomic(output, result)
    _say(f"mIoU {result['miou']:.2f} ({result['images']} images, {result['seconds']:.1f} s); {output}")
    return result

"""The pseudo-label stage: a config in, pseudo labels, a manifest, quality and a report out.

``run(config)`` is what ``python -m zsp_jax.label`` and ``python -m zsp_jax.main`` (stage
``label``) call. It reads the ``label`` section (``zsp_jax.label.options``), lists the images
(``label.images_dir``, or the ``data`` split's unlabelled / labelled images), loads or converts
the checkpoints, labels everything not finished yet (``zsp_jax.label.job``), and on process 0
merges the manifests, evaluates against ground truth where it exists and writes the report.
Several processes (``jax.distributed``) each take their share of the buckets.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from zsp_jax.label import job, model_files, outputs, quality, report
from zsp_jax.label.classes import load_classes
from zsp_jax.label.labeller import Labeller
from zsp_jax.label.options import LabelOptions
from zsp_jax.runtime import compile_cache_path, enable_compilation_cache
from zsp_jax.utils import io
from zsp_jax.utils.sharding import barrier


def out_dir_of(config: ml_collections.ConfigDict) -> str:
    """``label.out_dir``, or ``<workdir>/pseudo_labels``."""
    c = config.label
    return os.path.abspath(os.path.expanduser(c.out_dir or os.path.join(config.workdir, "pseudo_labels")))


def labels_dir_of(config: ml_collections.ConfigDict) -> str:
    """The folder of label maps the trainer reads (``data.pseudo_labels``)."""
    return os.path.join(out_dir_of(config), "labels")


def work_items(config: ml_collections.ConfigDict) -> list[job.WorkItem]:
    """The images to label: ``label.images_dir`` (a folder, recursive, EXIF applied, or one image), else the
    training's unlabelled folder (``data.unlabeled_dir``), else the config's data split."""
    from zsp_jax.data import readers, splits
    from zsp_jax.data.pseudo_labels import find_label

    c = config.label
    folder = c.images_dir
    if not folder and c.split == "unlabeled" and "data" in config and config.data.get("unlabeled_dir"):
        folder = config.data.unlabeled_dir  # the images the trainer will look up pseudo labels for
    if folder:
        path = os.path.abspath(os.path.expanduser(folder))
        examples = ([readers.Example(os.path.basename(path), path, None)] if os.path.isfile(path)
                    else readers.folder_examples(path))
        gt_dir = os.path.expanduser(c.gt_dir) if c.gt_dir else ""
        return [job.WorkItem(e.name, e.image, True,
                             find_label(gt_dir, e.name) if gt_dir else None) for e in examples]
    d = config.data
    layout = readers.make_layout(d.dataset, os.path.expanduser(d.root))
    labeled, unlabeled = splits.load_split(layout, os.path.expanduser(d.splits_dir), d.split)
    chosen = {"unlabeled": unlabeled, "labeled": labeled, "both": labeled + unlabeled}[c.split]
    items = []
    for e in chosen:
        gt = e.mask or next((m for m in layout.mask_candidates(e.name) if os.path.isfile(m)), None)
        items.append(job.WorkItem(e.name, e.image, layout.exif, gt))
    return items


def resolve_dtype(name: str) -> Any:
    """``label.dtype`` -> a jnp dtype ("auto" is float32: bfloat16's label agreement is measured by
    ``python -m zsp_jax.parity``, docs/parity.md)."""
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def parse_thresholds(spec: str) -> list[float]:
    """``"0.1:0.4:0.05"`` (start:stop:step, stop included) or ``"0.1,0.2"`` -> thresholds (at least one)."""
    import numpy as np

    spec = spec.strip()
    where = f"config field label.sweep_thresholds={spec!r}"
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError(f"{where}: start:stop:step needs start <= stop and a step > 0")
            values = [round(float(t), 6) for t in np.arange(start, stop + step / 2, step)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: expected start:stop:step or a,b,c (numbers)") from None
    if not values:
        raise ValueError(f"{where}: gives no threshold")
    return values


GT_SAMPLE = 8  # ground-truth masks decoded before labelling starts (the format of a folder, not every file)


def input_problems(config: ml_collections.ConfigDict, *, folder_only: bool = False) -> list[str]:
    """Every problem with the label stage's inputs, found before any work, one line each naming the field:
    the label settings and class list, the images, the ground truth (its format on a sample), the
    threshold sweep, the output folder and the SAM / CLIP checkpoints (kind and variant, nothing
    converted). ``preflight`` gathers these with the other stages' problems."""
    from zsp_jax.data import decode
    from zsp_jax.data.bad_input import BadInputError
    from zsp_jax.data.pseudo_labels import find_label

    c = config.label
    problems: list[str] = []
    try:
        options = LabelOptions.from_config(c, load_classes(c.classes))
    except ValueError as e:
        problems.append(str(e) if str(e).startswith(("config field", "class file", "classes")) else f"label: {e}")
        options = None
    images = os.path.expanduser(c.images_dir) if c.images_dir else ""
    if images and not os.path.exists(images):
        problems.append(f"label.images_dir={c.images_dir!r}: no such folder or image file")
    gt = os.path.expanduser(c.gt_dir) if c.gt_dir else ""
    if gt and not os.path.isdir(gt):
        problems.append(f"label.gt_dir={c.gt_dir!r}: no such folder (ground-truth masks at <gt_dir>/<image path "
                        f"without extension>.png)")
    elif gt and images and os.path.exists(images):
        from zsp_jax.data import readers

        names = ([os.path.basename(images)] if os.path.isfile(images)
                 else [e.name for e in readers.folder_examples(images)])
        found = [p for p in (find_label(gt, n) for n in names) if os.path.isfile(p)]
        if not found:
            problems.append(f"label.gt_dir={c.gt_dir!r}: holds no mask for any image (expected <gt_dir>/<image path "
                            f"without extension>.png, e.g. {find_label(gt, names[0]) if names else '...'})")
        for path in found[:GT_SAMPLE]:
            try:
                with open(path, "rb") as f:
                    decode.decode_mask(f.read(), path)
            except BadInputError as e:
                problems.append(f"label.gt_dir={c.gt_dir!r}: {e.path}: {e.reason}")
                break
    if c.sweep_thresholds:
        try:
            parse_thresholds(c.sweep_thresholds)
            parsed = True
        except ValueError as e:
            problems.append(str(e))
            parsed = False
        if parsed and images and not gt:
            problems.append(f"label.sweep_thresholds={c.sweep_thresholds!r}: a threshold sweep is scored against "
                            f"ground truth: give label.gt_dir (--gt) too")
        if options is not None and options.no_class != "cosine":
            problems.append(f"label.sweep_thresholds: needs label.no_class='cosine' (is {options.no_class!r})")
    out = out_dir_of(config)
    problem = io.writable_dir_problem(out)
    if problem:
        problems.append(f"label.out_dir={c.out_dir or out!r}: {problem}")
    if not folder_only:
        problems += checkpoint_problems(config)
    return problems


def checkpoint_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The SAM and CLIP checkpoints' problems: missing, unreadable, another kind or variant (nothing converted)."""
    c = config.label
    problems = []
    for what, describe, field, expected in (
            ("SAM", lambda: model_files.describe_sam(c.sam_checkpoint), "label.sam_checkpoint",
             c.get("sam_variant", "")),
            ("CLIP", lambda: model_files.describe_clip(c.clip_checkpoint, c.clip_model_name), "label.clip_checkpoint",
             c.get("clip_variant", ""))):
        try:
            found = describe()
        except model_files.CheckpointError as e:
            problems.append(f"{field}: {e}")
            continue
        if expected and found != expected:
            key = field.replace("checkpoint", "variant")
            problems.append(f"{field}={c[field.split('.')[1]]!r} holds {what} {found}, the config expects {expected} "
                            f"(set --config.{key}={found} to use it anyway, or --config.{key}='' to accept any)")
        if what == "SAM" and found == "custom" and not c.sam_allow_custom and not c.sam_checkpoint.endswith(
                ".safetensors"):
            problems.append(f"{field}={c.sam_checkpoint!r} is none of vit_b / vit_l / vit_h (truncated?); set "
                            "--config.label.sam_allow_custom=True if it is a custom SAM")
    return problems


def build_labeller(config: ml_collections.ConfigDict, options: LabelOptions, out_dir: str) -> Labeller:
    c = config.label
    dtype = resolve_dtype(c.dtype)
    cache = os.path.join(out_dir, "checkpoints")
    sam, _ = model_files.load_sam_checkpoint(c.sam_checkpoint, cache, dtype=dtype, allow_custom=c.sam_allow_custom,
                                             attention=c.attention)
    clip, tokenizer = model_files.load_clip_checkpoint(c.clip_checkpoint, cache, model_name=c.clip_model_name,
                                                       dtype=dtype, attention=c.attention)
    return Labeller(sam, clip, tokenizer, options, images_per_device=c.images_per_device,
                    decoder_group=c.decoder_group, mask_chunk=c.mask_chunk, text_cache_dir=cache)


def settings_of(config: ml_collections.ConfigDict, options: LabelOptions, labeller: Labeller) -> dict[str, Any]:
    c = config.label
    return {"options": options.fingerprint(), "sam_checkpoint": os.path.abspath(os.path.expanduser(c.sam_checkpoint)),
            "clip_checkpoint": os.path.abspath(os.path.expanduser(c.clip_checkpoint)),
            "text_embeddings": labeller.text_checkpoint, "matmul_precision": labeller.matmul_precision()}


def run(config: ml_collections.ConfigDict, *, progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Runs the stage; returns (and, on process 0, writes to ``<out>/summary.json``) its summary."""
    c = config.label
    options = LabelOptions.from_config(c, load_classes(c.classes))
    out_dir = out_dir_of(config)
    pid, count = jax.process_index(), jax.process_count()
    os.makedirs(out_dir, exist_ok=True)
    if config.get("synthetic") and not c.images_dir:
        from zsp_jax.data.inputs import prepare_synthetic

        if pid == 0:
            prepare_synthetic(config)
        barrier("zsp_label_synthetic")
    items = work_items(config)
    if not items:
        raise ValueError("nothing to label: " + (f"no images under {c.images_dir}" if c.images_dir
                                                 else f"the {c.split} part of split {config.data.split} is empty"))
    if c.compile_cache:
        enable_compilation_cache(compile_cache_path(c.compile_cache_dir, os.path.join(out_dir, ".jax_cache")))
    labeller = build_labeller(config, options, out_dir)
    settings = settings_of(config, options, labeller)
    if pid == 0:
        outputs.remove_stale_temporaries(out_dir)
        outputs.check_settings(out_dir, settings, overwrite=bool(c.overwrite))
        outputs.write_classes(out_dir, options.classes)
    barrier("zsp_label_start")
    if pid != 0:
        outputs.check_settings(out_dir, settings)
    log(f"labelling {len(items)} images into {out_dir} with {labeller.batch_size} per call "
        f"({jax.local_device_count()} device(s) x {labeller.tuning.images_per_device}), "
        f"{options.classes.num_labels - 1} classes from {options.classes.source}")
    mine = job.run_job(labeller, items, out_dir, threads=(c.decode_threads, c.write_threads), prefetch=c.prefetch,
                       process_index=pid, process_count=count, progress=progress, retry_failed=bool(c.retry_failed))
    io.write_json_atomic(os.path.join(out_dir, "manifest", f"{pid:03d}-of-{count:03d}.summary.json"), mine)
    barrier("zsp_label_done")
    if pid != 0:
        return mine
    return finish(config, options, out_dir, items, mine, log=log)


def finish(config: ml_collections.ConfigDict, options: LabelOptions, out_dir: str, items: list[job.WorkItem],
           mine: dict[str, Any], *, log: Any = print) -> dict[str, Any]:
    """Process 0, after every process is done: merged manifest, quality, report, summary."""
    c = config.label
    entries = outputs.read_manifests(out_dir)
    wanted = {i.name for i in items}
    entries = {n: e for n, e in entries.items() if n in wanted}
    manifest = outputs.write_merged_manifest(out_dir, entries.values())
    gt_of = {i.name: i.gt for i in items if i.gt}
    names = list(options.classes.names)
    result: dict[str, Any] = {
        "out_dir": out_dir, "labels_dir": os.path.join(out_dir, "labels"), "manifest": manifest,
        "images": len(items), "labelled_total": sum(e.get("status") == "ok" for e in entries.values()),
        "failed_total": sum(e.get("status") == "failed" for e in entries.values()),
        "this_run": mine,
        "failures": [{"name": n, "path": e.get("path"), "reason": e.get("error")} for n, e in sorted(entries.items())
                     if e.get("status") == "failed"],
    }
    quality_result = None
    if c.evaluate and gt_of:
        pairs = quality.evaluation_pairs(out_dir, entries, gt_of)
        if pairs:
            quality_result = quality.evaluate(pairs, names, threads=c.decode_threads)
            io.write_json_atomic(os.path.join(out_dir, "eval.json"), quality_result)
            result["eval"] = os.path.join(out_dir, "eval.json")
            result["miou"] = quality_result["as_labelled"]["miou"]
            log(quality.format_table(quality_result))
        if c.sweep_thresholds:
            if not options.write_segments or options.no_class != "cosine":
                raise ValueError("label.sweep_thresholds needs label.write_segments=True and label.no_class='cosine'")
            seg_pairs = quality.evaluation_pairs(out_dir, entries, gt_of, kind="segments")
            sweep = quality.sweep_thresholds(seg_pairs, parse_thresholds(c.sweep_thresholds), names,
                                             uncovered=options.rules().uncovered_value,
                                             paint_order=options.paint_order, threads=c.decode_threads)
            io.write_json_atomic(os.path.join(out_dir, "threshold_sweep.json"), sweep)
            result["threshold_sweep"] = os.path.join(out_dir, "threshold_sweep.json")
            best = max(sweep, key=lambda r: r["miou"]) if sweep else None
            for r in sweep:
                log(f"  threshold {r['threshold']:.3f}: mIoU {r['miou']:.2f}, coverage {r['coverage']:.1f} %, "
                    f"uncovered as background {r['miou_uncovered_as_background']:.2f}")
            if best:
                log(f"  best threshold {best['threshold']} (mIoU {best['miou']:.2f}); set label.threshold to use it")
    if c.report_images:
        result["report"] = report.write_report(out_dir, options.classes, entries, gt_of, n_images=c.report_images,
                                               quality=quality_result, summary=result)
    capped = [e for e in entries.values() if any("max_masks" in w for w in e.get("warnings") or ())]
    result["images_over_max_masks"] = len(capped)
    if capped:
        most = max(capped, key=lambda e: e.get("segments", 0))
        log(f"{len(capped)} of {len(entries)} images had more than label.amg.max_masks={options.amg.max_masks} "
            f"segments survive the filters; the best {options.amg.max_masks} were kept (e.g. {most['name']}). "
            f"Raise --config.label.amg.max_masks to keep more (the manifest lists the images)")
    io.write_json_atomic(os.path.join(out_dir, "summary.json"), result)
    log(f"pseudo labels: {result['labelled_total']} of {len(items)} images in {result['labels_dir']} "
        f"({mine['labelled']} this run, {mine['done_before']} before, {result['failed_total']} could not be read: "
        f"see {manifest})" + (f"; report {result['report']}" if "report" in result else ""))
    return result

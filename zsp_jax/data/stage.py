"""The data stage of the main job: prepare the data, check it, run the training input, show it.

Steps (each skips work already done, so a killed run resumes cheaply):

1. generated data (``config.synthetic``): write the VOC-layout dataset and the split if absent;
2. ``data.source="tfds"``: build the ArrayRecord dataset once (every file checked while
   building); ``"folder"``: check every listed file (cached in ``<workdir>/input_scan.json``);
3. bad inputs: stop with every bad file named (``on_bad_input="error"``) or leave them out and
   write ``<workdir>/bad_input.json`` (``"skip"``);
4. iterate ``data_stage.num_batches`` batches of the training input (labelled + unlabelled +
   mix streams) through ``device_augment.finalize`` with a progress bar;
5. write ``<workdir>/preview.png``, ``<workdir>/input_state.json`` (the iterator position) and
   ``<workdir>/data_stage.json`` (a summary with the measured rate).

``training_sources`` is the part a trainer reuses: config -> (labelled, unlabelled) sources.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from zsp_jax.data import bad_input, config as data_config, device_augment, pipeline, preview, readers, scan, sources
from zsp_jax.data import splits, synthetic, tfds_builders
from zsp_jax.utils import io

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingSources:
    labeled: Any
    unlabeled: Any
    problems: list[bad_input.Problem]
    exif_unlabeled: bool
    origin: str


def prepare_synthetic(config: ml_collections.ConfigDict) -> None:
    """Writes the generated dataset (``config.synthetic``) at ``data.root`` and the split at ``data.splits_dir``."""
    s, d = config.synthetic, config.data
    synthetic.make_voc_like(os.path.expanduser(d.root), num_train=s.num_train, num_val=s.num_val,
                            num_classes=d.num_classes, size_range=(s.min_size, s.max_size), seed=config.seed)
    lab, unl = splits.split_paths(os.path.expanduser(d.splits_dir), d.split)
    if not (os.path.isfile(lab) and os.path.isfile(unl)):
        splits.make_splits(readers.make_layout(d.dataset, d.root), os.path.expanduser(d.splits_dir), [d.split],
                           seed=config.seed)


def _scan(examples: list[readers.Example], what: str, config: ml_collections.ConfigDict, exif: bool,
          labeled: bool) -> tuple[list[readers.Example], list[bad_input.Problem]]:
    bar = tqdm.tqdm(total=len(examples), desc=f"checking {what}", unit="img", leave=False)
    res = scan.scan_examples(examples, num_classes=config.data.num_classes if labeled else None, exif=exif,
                             cache_path=os.path.join(config.workdir, "input_scan.json"), progress=bar.update)
    bar.close()
    return res.good, res.problems


def training_sources(config: ml_collections.ConfigDict) -> TrainingSources:
    """The labelled and unlabelled Grain sources of ``config``'s split, with the bad examples left out.

    Raises ``BadInputError`` listing every bad file if ``data.on_bad_input="error"``.
    """
    d = config.data
    layout = readers.make_layout(d.dataset, os.path.expanduser(d.root))
    labeled, unlabeled = splits.load_split(layout, os.path.expanduser(d.splits_dir), d.split)
    exif_unlabeled = False
    if d.unlabeled_dir:
        unlabeled = readers.folder_examples(d.unlabeled_dir)
        exif_unlabeled = True
    problems: list[bad_input.Problem] = []
    if d.source == "tfds":
        build = tfds_builders.build(d.dataset, layout.root, os.path.expanduser(d.tfds_dir),
                                    on_bad_input=d.on_bad_input)
        meta = tfds_builders.read_metadata(build)
        subset = tfds_builders.SUBSETS[d.dataset][0]
        index = {n: i for i, n in enumerate(meta["names"][subset])}
        skipped = {name: (path, reason) for name, path, reason in meta["skipped"].get(subset, [])}

        def pick(examples: list[readers.Example]) -> list[int]:
            out = []
            for e in examples:
                if e.name in index:
                    out.append(index[e.name])
                elif e.name in skipped:
                    problems.append(bad_input.Problem(e.name, *skipped[e.name]))
                elif not os.path.isfile(e.image):
                    problems.append(bad_input.Problem(e.name, e.image, "listed but missing"))
                else:
                    problems.append(bad_input.Problem(e.name, e.image, f"not in the {subset} split of the TFDS "
                                                                       f"build {build}"))
            return out

        lab_src = sources.TfdsSource(build, subset, pick(labeled), labeled=True)
        if d.unlabeled_dir:
            good, bad = _scan(unlabeled, "unlabelled folder", config, True, False)
            problems += bad
            unl_src = sources.FileSource(good)
        else:
            unl_src = sources.TfdsSource(build, subset, pick(unlabeled), labeled=False)
        origin = f"TFDS build {build}"
    else:
        good_l, bad_l = _scan(labeled, "labelled images", config, layout.exif, True)
        good_u, bad_u = _scan(unlabeled, "unlabelled images", config, exif_unlabeled or layout.exif, False)
        problems += bad_l + bad_u
        lab_src, unl_src = sources.FileSource(good_l), sources.FileSource(good_u)
        origin = f"files under {layout.root}" + (f" and {d.unlabeled_dir}" if d.unlabeled_dir else "")
    if d.on_bad_input == "error":
        bad_input.raise_for(problems, f"split {d.split}")
    return TrainingSources(lab_src, unl_src, problems, exif_unlabeled, origin)


def make_train_pipeline(config: ml_collections.ConfigDict, srcs: TrainingSources,
                        **overrides: Any) -> pipeline.TrainPipeline:
    """The ``TrainPipeline`` for ``config`` (keyword ``overrides`` replace its arguments, e.g. ``workers``)."""
    d, t = config.data, config.train
    kwargs = dict(crop_size=t.crop_size, global_batch_size=t.batch_size, seed=config.seed,
                  num_classes=d.num_classes, workers=d.workers, read_threads=d.read_threads,
                  strong_on_host=d.strong_aug == "host", mix_same_images=d.mix_same_images,
                  exif_unlabeled=srcs.exif_unlabeled, on_bad_input=d.on_bad_input)
    kwargs.update(overrides)
    return pipeline.TrainPipeline(srcs.labeled, srcs.unlabeled, **kwargs)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the data stage; returns (and writes to ``<workdir>/data_stage.json``) a summary."""
    data_config.validate(config)
    workdir = os.path.expanduser(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.get("synthetic"):
        prepare_synthetic(config)
    srcs = training_sources(config)
    report = os.path.join(workdir, "bad_input.json")
    bad_input.write_report(report, srcs.problems, f"split {config.data.split} of {config.data.dataset}")
    if srcs.problems:
        log.warning("%d bad input file(s) left out (listed in %s), e.g. %s: %s", len(srcs.problems), report,
                    srcs.problems[0].path, srcs.problems[0].reason)
    train = make_train_pipeline(config, srcs)
    print(f"data: {srcs.origin}")
    print(f"input: {train.describe()}; strong augmentations on {config.data.strong_aug}")
    finalize = jax.jit(device_augment.finalize)
    it = iter(train)
    n = config.data_stage.num_batches
    first = None
    t0 = time.perf_counter()
    t_first = None
    with tqdm.tqdm(total=n, desc="input batches", unit="batch") as bar:
        for _ in range(n):
            host = next(it)
            out = jax.block_until_ready(finalize(host))
            if first is None:
                first, t_first = out, time.perf_counter()
            bar.update(1)
    elapsed = time.perf_counter() - t0
    rate = (n - 1) / (time.perf_counter() - t_first) if n > 1 else None
    pipeline.save_state(it, os.path.join(workdir, "input_state.json"))
    if hasattr(it, "close"):
        it.close()
    preview_path = None
    if first is not None and config.data_stage.preview_images:
        preview_path = os.path.join(workdir, "preview.png")
        img = preview.make_preview(jax.tree.map(np.asarray, first), config.data_stage.preview_images)
        with io.atomic_path(preview_path) as tmp:
            img.save(tmp, format="PNG")
    summary = {
        "labeled": train.num_labeled, "unlabeled": train.num_unlabeled, "steps_per_epoch": train.steps_per_epoch,
        "batches": n, "seconds": round(elapsed, 2),
        "batches_per_s_after_first": None if rate is None else round(rate, 3),
        "bad_inputs": len(srcs.problems), "bad_input_report": report, "preview": preview_path,
        "shapes": None if first is None else jax.tree.map(lambda x: list(x.shape), first),
    }
    io.write_json_atomic(os.path.join(workdir, "data_stage.json"), summary)
    rate_s = "" if rate is None else f", {rate:.2f} batches/s after the first"
    print(f"done: {n} batches in {elapsed:.1f} s{rate_s}; {len(srcs.problems)} bad input file(s) left out "
          f"({report})" + (f"; preview {preview_path}" if preview_path else ""))
    return summary

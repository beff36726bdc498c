"""The data stage of the main job: prepare the data, check it, run the training input, show it.

Steps (each skips work already done, so a killed run resumes cheaply):

1. generated data (``config.synthetic``): write the VOC-layout dataset and the split if absent;
2. ``data.source="tfds"``: build the ArrayRecord dataset once (every file checked while
   building); ``"folder"``: check every listed file (cached in ``<workdir>/input_scan.json``);
   ``data.pseudo_labels`` (the label stage's maps), when that folder exists already, is checked
   and carried through the pipeline; before the label stage has run it is left out;
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

from zsp_jax.data import bad_input, config as data_config, decode, device_augment, pipeline, preview, readers, scan
from zsp_jax.data import sources
from zsp_jax.data import pseudo_labels as pseudo_label_io
from zsp_jax.data import splits, synthetic, tfds_builders
from zsp_jax.utils import io

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingSources:
    """The training split as Grain sources, after the bad-input checks.

    ``unlabeled`` carries pseudo labels (``pseudo_labels.WithPseudoLabels``) when they were asked
    for; ``unlabeled_examples`` are the unlabelled ``Example``s in source order (for relabelling).
    """

    labeled: Any
    unlabeled: Any
    problems: list[bad_input.Problem]
    exif_unlabeled: bool
    origin: str
    unlabeled_examples: list[readers.Example] = dataclasses.field(default_factory=list)
    pseudo_labels: str = ""


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


def _tfds_subset(config: ml_collections.ConfigDict, layout: readers.Layout, which: int
                 ) -> tuple[str, str, dict[str, int], dict[str, tuple[str, str]]]:
    """(build directory, subset name, name -> record index, name -> (path, reason) of the files the
    build left out) of the training (``which`` 0) or evaluation (1) subset; builds it if needed."""
    d = config.data
    build = tfds_builders.build(d.dataset, layout.root, os.path.expanduser(d.tfds_dir), on_bad_input=d.on_bad_input)
    meta = tfds_builders.read_metadata(build)
    subset = tfds_builders.SUBSETS[d.dataset][which]
    index = {n: i for i, n in enumerate(meta["names"][subset])}
    skipped = {name: (path, reason) for name, path, reason in meta["skipped"].get(subset, [])}
    return build, subset, index, skipped


def _in_build(examples: list[readers.Example], build: str, subset: str, index: dict[str, int],
              skipped: dict[str, tuple[str, str]], problems: list[bad_input.Problem]) -> list[readers.Example]:
    """The examples that are records of the build; each other one is appended to ``problems`` with why."""
    out = []
    for e in examples:
        if e.name in index:
            out.append(e)
        elif e.name in skipped:
            problems.append(bad_input.Problem(e.name, *skipped[e.name]))
        elif not os.path.isfile(e.image):
            problems.append(bad_input.Problem(e.name, e.image, "listed but missing"))
        else:
            problems.append(bad_input.Problem(e.name, e.image, f"not in the {subset} split of the TFDS build {build}"))
    return out


def training_sources(config: ml_collections.ConfigDict, *, pseudo_labels: str | None = None) -> TrainingSources:
    """The labelled and unlabelled Grain sources of ``config``'s split, with the bad examples left out.

    Args:
      config: the run's config (``data.*``).
      pseudo_labels: a folder of pseudo-label maps to attach to the unlabelled images (default
        ``config.data.pseudo_labels``; "" for none). Every map is checked first: an unlabelled
        image whose map is missing, undecodable or mis-sized is bad input.

    Raises ``BadInputError`` listing every bad file if ``data.on_bad_input="error"``.
    """
    d = config.data
    labels_dir = d.get("pseudo_labels", "") if pseudo_labels is None else pseudo_labels
    layout = readers.make_layout(d.dataset, os.path.expanduser(d.root))
    labeled, unlabeled = splits.load_split(layout, os.path.expanduser(d.splits_dir), d.split)
    exif_unlabeled = False
    if d.unlabeled_dir:
        unlabeled = readers.folder_examples(d.unlabeled_dir)
        exif_unlabeled = True
    problems: list[bad_input.Problem] = []
    if d.source == "tfds":
        build, subset, index, skipped = _tfds_subset(config, layout, 0)

        def pick(examples: list[readers.Example]) -> list[readers.Example]:
            return _in_build(examples, build, subset, index, skipped, problems)

        good_l = pick(labeled)
        if d.unlabeled_dir:
            good_u, bad = _scan(unlabeled, "unlabelled folder", config, True, False)
            problems += bad
        else:
            good_u = pick(unlabeled)

        def make_source(examples: list[readers.Example], labeled_: bool) -> Any:
            if labeled_ or not d.unlabeled_dir:
                return sources.TfdsSource(build, subset, [index[e.name] for e in examples], labeled=labeled_)
            return sources.FileSource(examples)

        origin = f"TFDS build {build}"
    else:
        good_l, bad_l = _scan(labeled, "labelled images", config, layout.exif, True)
        good_u, bad_u = _scan(unlabeled, "unlabelled images", config, exif_unlabeled or layout.exif, False)
        problems += bad_l + bad_u

        def make_source(examples: list[readers.Example], labeled_: bool) -> Any:
            return sources.FileSource(examples)

        origin = f"files under {layout.root}" + (f" and {d.unlabeled_dir}" if d.unlabeled_dir else "")
    if labels_dir:
        if not os.path.isdir(os.path.expanduser(labels_dir)):
            raise FileNotFoundError(f"config field data.pseudo_labels={labels_dir!r}: no such directory (the "
                                    f"labeller's output folder of pseudo-label maps)")
        bar = tqdm.tqdm(total=len(good_u), desc="checking pseudo labels", unit="img", leave=False)
        ok, bad = pseudo_label_io.check_pseudo_labels(
            good_u, labels_dir, num_classes=d.num_classes, exif=exif_unlabeled or layout.exif,
            cache_path=os.path.join(config.workdir, "input_scan.json"), progress=bar.update)
        bar.close()
        problems += bad
        ok_names = set(ok)
        good_u = [e for e in good_u if e.name in ok_names]
        origin += f", pseudo labels from {labels_dir}"
    if d.on_bad_input == "error":
        bad_input.raise_for(problems, f"split {d.split}")
    lab_src, unl_src = make_source(good_l, True), make_source(good_u, False)
    if labels_dir:
        unl_src = pseudo_label_io.WithPseudoLabels(unl_src, labels_dir)
    return TrainingSources(lab_src, unl_src, problems, exif_unlabeled, origin, good_u, labels_dir or "")


@dataclasses.dataclass
class EvalSources:
    """The evaluation images: a Grain source (records with masks), their ``Example``s and image sizes
    (H, W), in source order, after the bad-input checks."""

    source: Any
    examples: list[readers.Example]
    sizes: list[tuple[int, int]]
    problems: list[bad_input.Problem]


def eval_sources(config: ml_collections.ConfigDict) -> EvalSources:
    """``<data.splits_dir>/val.txt`` (UniMatch's format) as a source, bad examples left out (or an error
    listing them under ``data.on_bad_input="error"``). Image sizes come from the file headers."""
    d = config.data
    layout = readers.make_layout(d.dataset, os.path.expanduser(d.root))
    examples = splits.load_val(layout, os.path.expanduser(d.splits_dir))
    problems: list[bad_input.Problem] = []
    if d.source == "tfds":
        build, subset, index, skipped = _tfds_subset(config, layout, 1)
        good = _in_build(examples, build, subset, index, skipped, problems)
        source: Any = sources.TfdsSource(build, subset, [index[e.name] for e in good], labeled=True)
        sizes = [decode.image_size(e.image) for e in good]
    else:
        bar = tqdm.tqdm(total=len(examples), desc="checking evaluation images", unit="img", leave=False)
        res = scan.scan_examples(examples, num_classes=d.num_classes, exif=layout.exif,
                                 cache_path=os.path.join(os.path.expanduser(config.workdir), "input_scan.json"),
                                 progress=bar.update)
        bar.close()
        good, problems = res.good, res.problems
        source = sources.FileSource(good)
        sizes = [res.sizes[e.name] for e in good]
    if d.on_bad_input == "error":
        bad_input.raise_for(problems, "the evaluation list val.txt")
    if not good:
        raise ValueError(f"no usable evaluation image in {os.path.join(d.splits_dir, 'val.txt')}")
    return EvalSources(source, good, sizes, problems)


def make_train_pipeline(config: ml_collections.ConfigDict, srcs: TrainingSources,
                        **overrides: Any) -> pipeline.TrainPipeline:
    """The ``TrainPipeline`` for ``config`` (keyword ``overrides`` replace its arguments, e.g. ``workers``)."""
    d, t = config.data, config.train
    kwargs: dict[str, Any] = dict(
        crop_size=t.crop_size, global_batch_size=t.batch_size, seed=config.seed, num_classes=d.num_classes,
        workers=d.workers, read_threads=d.read_threads, strong_on_host=d.strong_aug == "host",
        mix_same_images=d.mix_same_images, exif_unlabeled=srcs.exif_unlabeled, on_bad_input=d.on_bad_input)
    kwargs.update(overrides)
    return pipeline.TrainPipeline(srcs.labeled, srcs.unlabeled, **kwargs)


def _available_pseudo_labels(config: ml_collections.ConfigDict) -> str:
    """``data.pseudo_labels`` if it names an existing folder, else "" (the data stage runs before the label
    stage writes them: the input is then shown without them, and training checks them when it starts)."""
    labels = config.data.get("pseudo_labels", "")
    if labels and os.path.isdir(os.path.expanduser(labels)):
        return labels
    if labels:
        print(f"data: pseudo labels {labels} not there yet (the label stage writes them); the input is shown "
              f"without them")
    return ""


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the data stage; returns (and writes to ``<workdir>/data_stage.json``) a summary."""
    data_config.validate(config)
    workdir = os.path.expanduser(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.get("synthetic"):
        prepare_synthetic(config)
    srcs = training_sources(config, pseudo_labels=_available_pseudo_labels(config))
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

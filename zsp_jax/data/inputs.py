"""A config's training and evaluation inputs: the split's Grain sources after the bad-input checks, and
the training pipeline.

* ``prepare_synthetic``: the generated dataset of the smoke run (``config.synthetic``);
* ``training_sources``: ``data.source="tfds"`` reads the ArrayRecord build (every file was checked
  while building), ``"folder"`` checks every listed file (cached in ``<workdir>/input_scan.json``);
  ``data.pseudo_labels`` (the label stage's maps) are checked and carried with the unlabelled
  images; bad inputs stop the run with every file named (``on_bad_input="error"``) or are left out
  and listed (``"skip"``);
* ``eval_sources``: the validation list; ``make_train_pipeline``: the Grain pipeline of a config (for
  ``model.family=unimatch_v2`` without the ``unlabeled_mix`` stream: V2's CutMix partner is the flipped
  batch; for a dataset without background, ADE20K, the labeller's maps are shifted onto its classes).

The data stage (the pipeline's preview) is ``zsp_jax.data.preview.run_data_stage``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections
import tqdm

from zsp_jax.data import bad_input, decode, pipeline, readers, scan
from zsp_jax.data import sources
from zsp_jax.data.classes import NO_BACKGROUND
from zsp_jax.data import pseudo_labels as pseudo_label_io
from zsp_jax.data import splits, synthetic, tfds_builders

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
            good_u, labels_dir, num_classes=d.num_classes + pseudo_label_shift(config),
            exif=exif_unlabeled or layout.exif,
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


def pseudo_label_shift(config: ml_collections.ConfigDict) -> int:
    """1 when the labeller's maps (0 = background, 1..N) must be shifted onto the dataset's classes (a dataset
    without background: ADE20K), else 0."""
    return int(config.data.dataset in NO_BACKGROUND)


def make_train_pipeline(config: ml_collections.ConfigDict, srcs: TrainingSources,
                        **overrides: Any) -> pipeline.TrainPipeline:
    """The ``TrainPipeline`` for ``config`` (keyword ``overrides`` replace its arguments, e.g. ``workers``).

    ``model.family=unimatch_v2`` makes no ``unlabeled_mix`` view (V2 CutMixes with the flipped batch).
    """
    d, t = config.data, config.train
    v2 = config.get("model") is not None and config.model.get("family", "deeplab") == "unimatch_v2"
    kwargs: dict[str, Any] = dict(
        crop_size=t.crop_size, global_batch_size=t.batch_size, seed=config.seed, num_classes=d.num_classes,
        workers=d.workers, read_threads=d.read_threads, strong_on_host=d.strong_aug == "host",
        mix_same_images=d.mix_same_images, exif_unlabeled=srcs.exif_unlabeled, on_bad_input=d.on_bad_input,
        with_mix=not v2, pseudo_label_shift=pseudo_label_shift(config))
    kwargs.update(overrides)
    return pipeline.TrainPipeline(srcs.labeled, srcs.unlabeled, **kwargs)

"""Enhanced-label option C: relabel the unlabelled set inside SAM segments, then train on the result.

``run_two_stage(config)`` (``train.mode="zsp"``, ``train.enhanced="relabel"``):

1. a first training run in ``train.relabel_first_mode`` (``unimatch``, or ``zsp`` with the
   zero-shot labels as fixed targets) in ``<workdir>/relabel_stage1``;
2. its best checkpoint predicts every unlabelled image (whole image, eval mode), and each of the
   labeller's SAM segments (``<labels root>/segments/<image>.json``) gets the model's majority
   class inside it if that class covers at least ``train.relabel_vote`` of the segment, else it
   keeps its zero-shot (CLIP) class; segments are painted largest first (small ones win),
   pixels outside every segment stay 255 = ignore, as in the zero-shot map. The maps go to
   ``<workdir>/enhanced_labels/`` (same layout as the labeller's), with ``relabel.json``;
3. the final run in ``<workdir>``: ``zsp`` with the enhanced maps as fixed targets.

Every step skips what is done (a finished first run, existing maps), so a killed run resumes.
The paper does not say how UniMatch "improves" the zero-shot labels; this is one reading
(docs/training.md, enhanced labels), chosen because it keeps SAM's boundaries and lets the
semi-supervised model correct CLIP's class per segment.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from zsp_jax.data import decode, pseudo_labels
from zsp_jax.data import inputs as data_inputs
from zsp_jax.data.synthetic import voc_palette
from zsp_jax.train import checkpoint_eval, evaluation, loop
from zsp_jax.train import state as state_lib
from zsp_jax.train.setup import setup_model
from zsp_jax.utils import io
from zsp_jax.utils.sharding import barrier

log = logging.getLogger(__name__)

STAGE1_DIR, LABELS_DIR, REPORT = "relabel_stage1", "enhanced_labels", "relabel.json"


def relabel_map(segment_masks: np.ndarray, zero_shot_classes: np.ndarray, prediction: np.ndarray, *,
                num_classes: int, vote: float) -> tuple[np.ndarray, int]:
    """One image's enhanced map.

    Args:
      segment_masks: bool (K, H, W) SAM segments.
      zero_shot_classes: int (K,) their CLIP classes.
      prediction: int (H, W) the model's classes.
      num_classes: C.
      vote: the share of a segment the majority class must cover to replace the zero-shot class.

    Returns:
      (uint8 (H, W) map, 255 outside every segment; number of segments whose class changed).
    """
    h, w = prediction.shape
    out = np.full((h, w), 255, np.uint8)
    areas = segment_masks.reshape(len(segment_masks), -1).sum(1)
    changed = 0
    for k in np.argsort(-areas, kind="stable"):  # largest first: smaller segments are painted over it
        if areas[k] == 0:
            continue
        counts = np.bincount(prediction[segment_masks[k]].astype(np.int64), minlength=num_classes)[:num_classes]
        majority = int(np.argmax(counts))
        cls = majority if counts[majority] >= vote * areas[k] else int(zero_shot_classes[k])
        changed += int(cls != int(zero_shot_classes[k]))
        out[segment_masks[k]] = cls
    return out, changed


class _Subset:
    """Records ``indices`` of a Grain source, as a source."""

    def __init__(self, source: Any, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.source[self.indices[k]]


def relabel(config: ml_collections.ConfigDict, checkpoint: str, out_dir: str) -> dict[str, Any]:
    """Writes the enhanced map of every unlabelled image of ``config``'s split into ``out_dir``.

    ``checkpoint`` is a run's checkpoint directory (as ``checkpoint_eval.evaluate`` takes). Maps already in
    ``out_dir`` are kept (a killed relabelling resumes). Returns (and writes to
    ``<out_dir>/relabel.json``) counts.

    Several processes: the predictions are sharded like an evaluation and every process gets all of
    them; each writes its share of the maps (``out_dir`` on a filesystem they share) and all wait
    for each other before returning, so the next run finds every map.
    """
    report_path = os.path.join(out_dir, REPORT)
    if os.path.isfile(report_path):
        with open(report_path) as f:
            return json.load(f)
    segments_dir = pseudo_labels.find_segments_dir(config.data.pseudo_labels, config.data.pseudo_label_segments)
    srcs = data_inputs.training_sources(config, pseudo_labels="")
    examples = srcs.unlabeled_examples
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    setup = setup_model(config, workdir)
    params, stats, description = checkpoint_eval.load_weights(config, setup, checkpoint)
    params, stats = state_lib.place((params, stats), state_lib.state_shardings((params, stats), setup.placement.mesh))
    # The same list in every process: no process writes a map before all have started predicting (the
    # predictions are collective), so all see the same files here.
    keep_extension = pseudo_labels.clashing_names(e.name for e in examples)
    map_paths = [os.path.join(out_dir, pseudo_labels.label_relpath(e.name, keep_extension=e.name in keep_extension))
                 for e in examples]
    todo = [i for i in range(len(examples)) if not os.path.isfile(map_paths[i])]
    exif = srcs.exif_unlabeled
    sizes = [decode.image_size(examples[i].image, exif=exif) for i in todo]
    predictor = evaluation.Predictor(setup.graphdef, _Subset(srcs.unlabeled, todo), sizes, setup.placement,
                                     mode="original", crop=config.train.crop_size, bucket=config.eval.bucket,
                                     batch_size=config.eval.batch_size, num_classes=config.data.num_classes,
                                     threads=config.eval.threads, exif=exif)
    palette = voc_palette()
    changed = segments = 0
    bar = tqdm.tqdm(total=len(todo), desc="relabelling in SAM segments", unit="img",
                    disable=jax.process_index() != 0)
    for k, pred in predictor.predictions(params, stats, progress=False):
        bar.update(1)
        ex = examples[todo[k]]
        record = pseudo_labels.read_segments(segments_dir, ex.name)
        masks = pseudo_labels.segment_masks(record)
        if masks.shape[1:] != pred.shape:
            raise ValueError(f"{segments_dir}: the segments of {ex.name} are {masks.shape[2]}x{masks.shape[1]} (WxH), "
                             f"its image {pred.shape[1]}x{pred.shape[0]}")
        zero_shot = np.array([s["class"] for s in record["segments"]], np.int64)
        new, n = relabel_map(masks, zero_shot, pred, num_classes=config.data.num_classes,
                             vote=config.train.relabel_vote)
        changed += n  # every process counts every image: the report is complete whichever writes it
        segments += len(zero_shot)
        if k % jax.process_count() == jax.process_index():  # each process writes its share
            io.write_bytes_atomic(map_paths[todo[k]], decode.encode_png(new, palette))
    bar.close()
    barrier("zsp_relabel_maps")
    report = {"checkpoint": description, "images": len(examples), "relabelled_now": len(todo),
              "segments": segments, "segments_changed": changed, "vote": config.train.relabel_vote,
              "segments_dir": segments_dir}
    if jax.process_index() == 0:
        io.write_json_atomic(report_path, report)
    barrier("zsp_relabel_report")
    return report


def _replaced(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields replaced (``train.mode="unimatch"``)."""
    out = copy.deepcopy(config)
    with out.unlocked():
        for dotted, value in fields.items():
            section, _, key = dotted.rpartition(".")
            (out[section] if section else out)[key] = value
    return out


def run_two_stage(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Option C end to end (see the module docstring); returns the final run's summary with a
    ``relabel`` entry (the first run's summary and the relabelling counts)."""
    pseudo_labels.find_segments_dir(config.data.pseudo_labels, config.data.pseudo_label_segments)  # fail early
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    first = _replaced(config, **{"workdir": os.path.join(workdir, STAGE1_DIR), "train.mode": config.train.relabel_first_mode,
                             "train.enhanced": "fixed"})
    tqdm.tqdm.write(f"relabel: first run ({config.train.relabel_first_mode}) in {first.workdir}")
    first_summary = loop.train(first)
    checkpoint = first_summary.get("best_checkpoint") or first_summary.get("latest_checkpoint")
    labels_dir = os.path.join(workdir, LABELS_DIR)
    report = relabel(first, checkpoint, labels_dir)
    tqdm.tqdm.write(f"relabel: {report['segments_changed']} of {report['segments']} segments changed class; "
                    f"maps in {labels_dir}")
    final = _replaced(config, **{"data.pseudo_labels": labels_dir, "train.enhanced": "fixed"})
    summary = loop.train(final)
    summary["enhanced"] = "relabel"
    summary["relabel"] = {"first_run": first_summary, "enhanced_labels": labels_dir, **report}
    return summary

"""Enhanced-label option C end to end: ``train.run.run`` with ``train.enhanced="relabel"`` trains a first run,
relabels every unlabelled image inside its SAM segments with that run's best checkpoint, trains the final
run on the relabelled maps, and a rerun redoes nothing. The vote rule is checked at its two ends on the
same checkpoint (vote > 1: the zero-shot maps come back; vote 0: every segment takes the model's class)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from .conftest import smoke_config
from zsp_jax.data import decode, pseudo_labels, readers, splits, synthetic
from zsp_jax.train import loop, relabel
from zsp_jax.train import training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("relabel")
    root = synthetic.make_voc_like(str(base / "VOC2012"), num_train=12, num_val=4, size_range=(64, 96), seed=5)
    layout = readers.VocLayout(root)
    sp = str(base / "splits")
    splits.make_splits(layout, sp, ["1_4"], seed=0)
    _, unlabeled = splits.load_split(layout, sp, "1_4")
    labels = str(base / "pseudo_labels" / "labels")
    synthetic.make_pseudo_labels([layout.resolve(u.name) for u in unlabeled], labels, num_classes=21,
                                 corrupt_fraction=0.3, seed=0, segments_dir=str(base / "pseudo_labels" / "segments"))
    c = smoke_config(str(base / "run"), root, sp, split="1_4", pseudo_labels=labels)
    c.train.mode, c.train.enhanced, c.train.relabel_first_mode = "zsp", "relabel", "zsp"
    c.train.crop_size, c.train.max_steps, c.train.num_devices = 64, 4, 1
    c.train.relabel_vote = 0.5
    c.eval.bucket = 96
    summary = training.run(c)
    return {"config": c, "summary": summary, "labels": labels, "unlabeled": unlabeled,
            "segments": pseudo_labels.find_segments_dir(labels)}


def _map(folder, name):
    with open(pseudo_labels.label_path(folder, name), "rb") as f:
        return decode.decode_mask(f.read(), name)


def _segment_classes(m, masks):
    """The one class each segment holds in map ``m`` (asserting it is uniform)."""
    out = []
    for seg in masks:
        values = np.unique(m[seg])
        assert len(values) == 1, values
        out.append(int(values[0]))
    return np.array(out)


def test_two_runs_and_maps_inside_sam_segments(run):
    s, workdir = run["summary"], run["config"].workdir
    first = s["relabel"]["first_run"]
    assert first["steps"] == 4 and first["workdir"] == os.path.join(workdir, relabel.STAGE1_DIR)
    assert s["steps"] == 4 and s["enhanced"] == "relabel" and s["best_miou"] is not None
    labels_dir = s["relabel"]["enhanced_labels"]
    assert labels_dir == os.path.join(workdir, relabel.LABELS_DIR)
    report = json.loads((open(os.path.join(labels_dir, relabel.REPORT)).read()))
    assert report["images"] == len(run["unlabeled"]) == 9 and report["relabelled_now"] == 9
    changed = segments = 0
    for ex in run["unlabeled"]:
        record = pseudo_labels.read_segments(run["segments"], ex.name)
        masks = pseudo_labels.segment_masks(record)
        zero_shot = np.array([r["class"] for r in record["segments"]])
        new = _map(labels_dir, ex.name)
        assert np.all(new[~masks.any(0)] == 255)  # outside every segment: ignore, as the zero-shot map
        classes = _segment_classes(new, masks)
        changed += int(np.sum(classes != zero_shot))
        segments += len(masks)
    assert (changed, segments) == (report["segments_changed"], report["segments"]) and segments > 9
    # The final run trained on the relabelled maps, not on the zero-shot ones.
    final_config = json.loads(open(os.path.join(workdir, loop.CONFIG_FILE)).read())
    assert final_config["data"]["pseudo_labels"] == labels_dir and final_config["train"]["enhanced"] == "fixed"


def test_vote_rule_at_both_ends_on_the_first_runs_checkpoint(run, tmp_path):
    first = relabel._replaced(run["config"], **{"workdir": run["summary"]["relabel"]["first_run"]["workdir"]})
    ckpt = run["summary"]["relabel"]["first_run"]["best_checkpoint"]
    never = relabel.relabel(relabel._replaced(first, **{"train.relabel_vote": 1.01}), ckpt, str(tmp_path / "never"))
    always = relabel.relabel(relabel._replaced(first, **{"train.relabel_vote": 0.0}), ckpt, str(tmp_path / "always"))
    assert never["segments_changed"] == 0 and always["segments_changed"] >= run["summary"]["relabel"]["segments_changed"]
    for ex in run["unlabeled"]:
        masks = pseudo_labels.segment_masks(pseudo_labels.read_segments(run["segments"], ex.name))
        np.testing.assert_array_equal(_map(tmp_path / "never", ex.name), _map(run["labels"], ex.name))
        half = _segment_classes(_map(run["summary"]["relabel"]["enhanced_labels"], ex.name), masks)
        zero = _segment_classes(_map(run["labels"], ex.name), masks)
        majority = _segment_classes(_map(tmp_path / "always", ex.name), masks)  # the model's class per segment
        # vote 0.5: a segment that changed took the model's majority class.
        assert np.all((half == zero) | (half == majority))


def test_rerun_redoes_nothing(run, capsys):
    again = training.run(run["config"])
    out = capsys.readouterr().out
    assert "train step compiled" not in out
    assert again["relabel"]["relabelled_now"] == 9 and again["best_miou"] == run["summary"]["best_miou"]

"""Semi-supervised training with the UniMatch V2 trainer on a generated few-label task (a tiny random DINOv2 + DPT,
fixed seeds, not timed): ``zsp`` with informative zero-shot labels beats ``supervised`` after the same steps, and
``unimatch_v2`` trains its EMA teacher's pseudo labels into the student.

The task: 32 training images of 6 classes with a strong per-image colour cast, 4 of them labelled, chosen so that
the labelled images show only background and classes 1 and 3; 16 validation images. The stand-in zero-shot labels of
the 28 unlabelled images are the ground truth with 15% of the segments given a wrong class, so they carry classes
2, 4 and 5, which the labelled images never show: ``zsp`` must learn them from the labels, ``supervised`` cannot.

What is asserted, and why only that (measured on the 2-core development machine, student / EMA teacher):
``zsp``'s mIoU over the classes present beats ``supervised``'s by a wide margin, from its IoU on the classes the
labelled images lack (the steady effect). ``unimatch_v2`` re-uses only what the labelled images teach (its teacher
predicts no class they lack); on a tiny random ViT with 4 x 4 patches, 150 steps did not give it a steady margin
over ``supervised`` (mIoU over the classes present from 4 points below to 1 point above in the runs tried), so the
test asserts what held: its teacher's pseudo labels enter the loss (the confident share of the weak views grows
from 0) and it ends within a few points of ``supervised``.

The three runs go through ``training.run`` in one subprocess, so that XLA compiles at -O0 (``FAST_XLA_FLAGS``, set
before the backend starts): compilation dominates runs of tiny models on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO, subprocess_env

STEPS = 150
NUM_CLASSES = 6
SEEN = (0, 1, 3)  # the classes the labelled images show


def make_task(base: str) -> dict[str, str]:
    """The generated task (see the module docstring) under ``base``: dataset, split ``few`` and pseudo labels."""
    from PIL import Image

    from zsp_jax.data import readers, splits, synthetic

    root = synthetic.make_voc_like(os.path.join(base, "VOC2012"), num_train=32, num_val=16, size_range=(64, 76),
                                   seed=1, cast=0.6, num_classes=NUM_CLASSES)
    layout = readers.VocLayout(root)
    train = layout.subset("train")
    shows = {e.name: set(np.unique(np.asarray(Image.open(e.mask))).tolist()) - {255} for e in train}
    labeled = [e for e in train if shows[e.name] <= set(SEEN) and len(shows[e.name]) > 1][:4]
    assert len(labeled) == 4 and set().union(*(shows[e.name] for e in labeled)) == set(SEEN)
    unlabeled = [e for e in train if e not in labeled]
    sp = os.path.join(base, "splits")
    splits.write_split(layout, sp, "few", labeled, unlabeled)
    splits.write_split_file(os.path.join(sp, "val.txt"), splits.example_pairs(layout, layout.subset("val")))
    labels = os.path.join(base, "pseudo_labels")
    stats = synthetic.make_pseudo_labels([layout.resolve(u.name) for u in unlabeled], labels,
                                         num_classes=NUM_CLASSES, corrupt_fraction=0.15, seed=0)
    assert stats["corrupted"] > 0
    return {"root": root, "splits": sp, "labels": labels}


def run_modes(base: str, modes: list[str], steps: int = STEPS) -> dict[str, dict]:
    """Trains each mode on the task under ``base`` (1 device) with ``configs/smoke.py:family=v2``; returns per mode
    the final evaluations of the student and the EMA teacher and the last logged mask ratio."""
    from tests.train.conftest import smoke_config
    from zsp_jax.train import logs, training

    task = make_task(base)
    out = {}
    for mode in modes:
        c = smoke_config(os.path.join(base, mode), task["root"], task["splits"], split="few",
                         arg="source=folder,workers=0,family=v2", pseudo_labels=task["labels"] if mode == "zsp" else "")
        c.train.update(mode=mode, max_steps=steps, epochs=1000, num_devices=1, lr=1e-3,
                       conf_thresh=0.7,  # a tiny model trained for 150 steps is rarely 95% sure
                       ema_cap=0.9)      # V2's 0.996 averages over ~250 steps: longer than this run
        c.eval.every_epochs = 0
        c.checkpoint.every_steps, c.checkpoint.keep = 0, 1
        summary = training.run(c)
        assert summary["steps"] == steps
        metrics = logs.read_jsonl(os.path.join(c.workdir, logs.TRAIN_LOG))
        out[mode] = {"student": summary["final_eval"], "ema": summary["final_eval_ema"],
                     "mask_ratio": [m.get("mask_ratio") for m in metrics]}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("few_label_v2"))
    out = os.path.join(base, "results.json")
    code = (f"import json; from tests.train_v2.modes_test import run_modes; "
            f"json.dump(run_modes({base!r}, ['supervised', 'zsp', 'unimatch_v2']), open({out!r}, 'w'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.load(open(out))


def _unseen_iou(result: dict) -> float:
    per_class = list(result["per_class"].values())[:NUM_CLASSES]
    return float(np.mean([per_class[c] or 0.0 for c in range(NUM_CLASSES) if c not in SEEN]))


def test_zsp_beats_supervised_and_unimatch_v2_uses_its_teacher(results):
    summary = {mode: {who: (round(r[who]["miou_present"], 1), round(r[who]["pixel_accuracy"], 1),
                            round(_unseen_iou(r[who]), 1)) for who in ("student", "ema")}
               for mode, r in results.items()}
    print("(mIoU over present classes, pixel accuracy, IoU over the unseen classes):", summary)
    sup, zsp, uni = results["supervised"], results["zsp"], results["unimatch_v2"]
    assert sup["student"]["pixel_accuracy"] > 70  # it learned something: the comparison is not against chance
    for who in ("student", "ema"):  # the zero-shot labels teach the classes the labelled images lack
        assert _unseen_iou(zsp[who]) >= _unseen_iou(sup[who]) + 5.0, summary
        assert zsp[who]["miou_present"] >= sup[who]["miou_present"] + 3.0, summary
    ratios = [r for r in uni["mask_ratio"] if r is not None]
    assert ratios[0] == 0.0 and max(ratios[-20:]) > 0.3, ratios[::10]  # the teacher's labels enter the loss
    assert uni["student"]["miou_present"] >= sup["student"]["miou_present"] - 6.0, summary

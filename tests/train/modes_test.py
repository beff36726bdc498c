"""Semi-supervised training pays off: on a generated few-label task, ``unimatch`` and ``zsp`` (with stand-in
zero-shot labels: ground truth with 30% of the segments given a wrong class) end with a clearly higher
validation pixel accuracy than ``supervised`` after the same number of steps, ``zsp`` also a higher
mIoU (fixed seeds; not timed).

The task: 32 training images, 4 of them labelled (split 1_8), 16 validation images, 6 classes drawn
(the model has VOC's 21 outputs), and a strong per-image colour cast, so that 4 labelled images do not
show every appearance of a class; UniMatch's strong views (colour jitter, grayscale, blur, CutMix) and
the pseudo labels of the 28 unlabelled images both bring what they miss. Measured on the 2-core
development machine in two runs (mIoU over the classes present / pixel accuracy, %): supervised
21.3 / 66.0 and 23.5 / 70.2, unimatch 25.1 / 77.8 and 19.8 / 74.2, zsp 25.0 / 74.0 and 26.2 / 74.5.
"""

from __future__ import annotations

import pytest

from zsp_jax.data import readers, splits, synthetic
from zsp_jax.train import training

from .conftest import smoke_config

STEPS = 200


@pytest.fixture(scope="module")
def few_label_task(tmp_path_factory):
    base = tmp_path_factory.mktemp("few_label")
    root = synthetic.make_voc_like(str(base / "VOC2012"), num_train=32, num_val=16, size_range=(64, 96), seed=1,
                                   cast=0.6, num_classes=6)
    layout = readers.VocLayout(root)
    sp = str(base / "splits")
    splits.make_splits(layout, sp, ["1_8"], seed=0)
    labeled, unlabeled = splits.load_split(layout, sp, "1_8")
    assert (len(labeled), len(unlabeled)) == (4, 28)
    labels = str(base / "pseudo_labels")
    stats = synthetic.make_pseudo_labels([layout.resolve(u.name) for u in unlabeled], labels, num_classes=6,
                                         corrupt_fraction=0.3, seed=0)
    assert stats["corrupted"] > 0 and stats["pixel_accuracy"] < 0.95
    return base, root, sp, labels


def _train(task, mode: str) -> dict:
    base, root, sp, labels = task
    c = smoke_config(str(base / mode), root, sp, split="1_8", pseudo_labels=labels if mode == "zsp" else "")
    c.train.mode = mode
    c.train.crop_size = 64
    c.train.max_steps = STEPS
    c.train.epochs = 1000  # max_steps decides
    c.train.num_devices = 1
    c.train.conf_thresh = 0.9  # a tiny model trained for 200 steps is rarely 95% sure
    c.eval.every_epochs = 0
    c.eval.bucket = 96
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 1
    summary = training.run(c)
    assert summary["steps"] == STEPS and summary["final_eval"] is not None
    return summary["final_eval"]


def test_unimatch_and_zsp_beat_supervised(few_label_task):
    results = {mode: _train(few_label_task, mode) for mode in ("supervised", "unimatch", "zsp")}
    miou = {mode: r["miou_present"] for mode, r in results.items()}
    accuracy = {mode: r["pixel_accuracy"] for mode, r in results.items()}
    print("mIoU over present classes:", miou, "pixel accuracy:", accuracy)
    assert miou["supervised"] > 10  # it learned something: the comparison is not against chance
    for mode in ("unimatch", "zsp"):
        assert accuracy[mode] >= accuracy["supervised"] + 2.0, accuracy
    # mIoU over 6 classes on 16 images moves by several points between runs of a 200-step tiny model
    # (seen: unimatch -3.6 to +3.8 against supervised); the pseudo labels' gain is the steadier one.
    assert miou["zsp"] >= miou["supervised"] + 1.0, miou

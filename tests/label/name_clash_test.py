"""Images whose names differ only by extension (``x.jpg`` beside ``x.png``) each get their own pseudo-label map
(``x.jpg.png``, ``x.png.png``; others keep ``<stem>.png``), and the trainer finds each image's own map.
Also: the labeller says on the console how many images hit ``label.amg.max_masks``."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from tests.train.conftest import smoke_config
from zsp_jax.data import decode, readers, splits, synthetic
from zsp_jax.data import inputs as data_inputs
from zsp_jax.data.pseudo_labels import clashing_names, find_label, label_relpath
from zsp_jax.label import labelling
from zsp_jax.models.random_checkpoints import random_weight_label_config, tiny_checkpoints
from zsp_jax.references.amg import sample_images


def test_label_relpath_rule():
    names = ["a/x.jpg", "a/x.png", "a/y.jpg", "b/x.jpg"]
    assert clashing_names(names) == {"a/x.jpg", "a/x.png"}
    assert label_relpath("a/x.jpg", keep_extension=True) == "a/x.jpg.png"
    assert label_relpath("a/y.jpg") == "a/y.png"


def test_a_folder_with_clashing_names_is_labelled_whole_and_trained_from(tmp_path):
    import ml_collections

    root = synthetic.make_voc_like(str(tmp_path / "VOC2012"), num_train=8, num_val=2, size_range=(64, 80), seed=1)
    sp = str(tmp_path / "splits")
    splits.make_splits(readers.VocLayout(root), sp, ["1_4"], seed=0)
    photos = tmp_path / "photos"
    photos.mkdir()
    pictures = sample_images([(70, 90), (80, 64), (64, 64)])
    for name, picture in zip(("x.jpg", "x.png", "y.jpg"), pictures):
        Image.fromarray(picture).save(photos / name)
    sam, clip = tiny_checkpoints(str(tmp_path / "weights"))

    config = ml_collections.ConfigDict({"seed": 0, "workdir": str(tmp_path / "label_run")})
    config.label = random_weight_label_config()
    config.label.update(images_dir=str(photos), out_dir=str(tmp_path / "pl"), sam_checkpoint=sam,
                        clip_checkpoint=clip, classes="voc", report_images=0, bucket=96)
    config.label.amg.max_masks = 4  # random-weight masks all survive: every image goes over the cap
    assert labelling.input_problems(config) == []
    lines: list[str] = []
    result = labelling.run(config, progress=False, log=lines.append)
    assert result["labelled_total"] == 3 and result["failed_total"] == 0
    labels = tmp_path / "pl" / "labels"
    assert sorted(os.listdir(labels)) == ["x.jpg.png", "x.png.png", "y.png"]
    capped = [line for line in lines if "label.amg.max_masks=4" in line]
    assert len(capped) == 1 and capped[0].startswith("3 of 3 images") and "--config.label.amg.max_masks" in capped[0]

    # The trainer reads the folder as its unlabelled set: each image finds its own map, none is bad input.
    c = smoke_config(str(tmp_path / "train_run"), root, sp, split="1_4", pseudo_labels=str(labels))
    c.data.unlabeled_dir = str(photos)
    c.train.batch_size = 2
    sources = data_inputs.training_sources(c)
    assert not sources.problems and len(sources.unlabeled) == 3
    maps = {name: find_label(str(labels), name) for name in ("x.jpg", "x.png", "y.jpg")}
    assert maps == {"x.jpg": str(labels / "x.jpg.png"), "x.png": str(labels / "x.png.png"),
                    "y.jpg": str(labels / "y.png")}
    records = {sources.unlabeled[i]["name"]: sources.unlabeled[i] for i in range(3)}
    for name, record in records.items():
        image = decode.decode_image(record["image"])
        label = decode.decode_mask(record["pseudo_label"])
        assert label.shape == image.shape[:2], name  # x.jpg and x.png differ in size: each has its own map
    batch = next(iter(data_inputs.make_train_pipeline(c, sources, with_unlabeled=True)))
    assert np.asarray(batch["unlabeled"]["pseudo_label"]).shape[0] == c.train.batch_size

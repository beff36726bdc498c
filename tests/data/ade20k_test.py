"""ADE20K (``ADEChallengeData2016``, UniMatch V2's layout and annotations) on a generated folder: the reader, UniMatch
V2's split lists read as they are (paths with extensions, a val list beside them), seeded splits of V2's sizes, the
class range (150 classes, 255 = other), the original zip's annotations (0 = other, 1..150) refused and mapped, the
TFDS build, and the V2 pipeline (no CutMix mix stream; the labeller's maps, 0 = background and 1..150, moved onto
ADE20K's classes)."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest

from zsp_jax.data import bad_input, decode, readers, scan, splits, synthetic, tfds_builders
from zsp_jax.data import config as data_config
from zsp_jax.data import inputs as data_inputs
from zsp_jax.data.classes import ADE20K_CLASSES, NUM_CLASSES
from zsp_jax.utils import io

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_TRAIN, NUM_VAL = 8, 3


def write_ade20k(top: str, *, original: bool = False, seed: int = 0) -> str:
    """``<top>/ADEChallengeData2016`` with 8 training and 3 validation images (56..80 px) and masks in UniMatch V2's
    form (classes 0..149, 255 on the shapes' borders), or with ``original`` in the zip's form (0 = other, 1..150)."""
    root = os.path.join(top, "ADEChallengeData2016")
    rng = np.random.default_rng(seed)
    for subset, prefix, n in (("training", "ADE_train", NUM_TRAIN), ("validation", "ADE_val", NUM_VAL)):
        for i in range(1, n + 1):
            h, w = (int(v) for v in rng.integers(56, 81, 2))
            image, mask = synthetic.make_image(rng, h, w, 150)
            mask[: h // 6] = 255  # every V2 annotation has unlabelled "other" pixels
            mask[0, 0] = 149
            if original:
                mask = np.where(mask == 255, 0, mask.astype(np.int64) + 1).astype(np.uint8)
            stem = f"{prefix}_{i:08d}"
            io.write_bytes_atomic(os.path.join(root, "images", subset, stem + ".jpg"), decode.encode_jpeg(image))
            io.write_bytes_atomic(os.path.join(root, "annotations", subset, stem + ".png"), decode.encode_png(mask))
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> str:
    return write_ade20k(str(tmp_path_factory.mktemp("ade")))


def _v2_lists(root: str, out: str) -> str:
    """Split lists as UniMatch V2 publishes them (splits/ade20k/<split>/{labeled,unlabeled}.txt, val.txt): image and
    mask paths with extensions, relative to the dataset root."""
    def line(subset: str, stem: str) -> str:
        return f"images/{subset}/{stem}.jpg annotations/{subset}/{stem}.png\n"

    train = [f"ADE_train_{i:08d}" for i in range(1, NUM_TRAIN + 1)]
    io.write_text_atomic(os.path.join(out, "1_4", "labeled.txt"), "".join(line("training", s) for s in train[:2]))
    io.write_text_atomic(os.path.join(out, "1_4", "unlabeled.txt"), "".join(line("training", s) for s in train[2:]))
    io.write_text_atomic(os.path.join(out, "val.txt"),
                         "".join(line("validation", f"ADE_val_{i:08d}") for i in range(1, NUM_VAL + 1)))
    return out


def test_layout_v2_split_lists_and_seeded_splits(ade_root, tmp_path):
    assert len(ADE20K_CLASSES) == NUM_CLASSES["ade20k"] == 150 and ADE20K_CLASSES[0] == "wall"
    layout = readers.make_layout("ade20k", os.path.dirname(ade_root))  # the parent of ADEChallengeData2016 too
    assert layout.root == ade_root
    train, val = layout.subset("training"), layout.subset("validation")
    assert [e.name for e in train] == [f"images/training/ADE_train_{i:08d}.jpg" for i in range(1, NUM_TRAIN + 1)]
    assert len(val) == NUM_VAL and all(os.path.isfile(e.mask) and "/annotations/validation/" in e.mask for e in val)
    with pytest.raises(FileNotFoundError, match="images/ and annotations/"):
        readers.Ade20kLayout(str(tmp_path / "nowhere"))
    # UniMatch V2's lists as they are
    lists = _v2_lists(ade_root, str(tmp_path / "v2_splits"))
    labeled, unlabeled = splits.load_split(layout, lists, "1_4")
    assert [e.name for e in labeled] == [e.name for e in train[:2]] and len(unlabeled) == NUM_TRAIN - 2
    assert labeled[0].mask == train[0].mask and all(e.mask is None for e in unlabeled)
    assert [e.mask for e in splits.load_val(layout, lists)] == [e.mask for e in val]
    # seeded splits: ceil(n / 4) labelled, the rest unlabelled, the validation list
    made = splits.make_splits(layout, str(tmp_path / "made"), ["1_4"], seed=0)
    assert made == {"1_4": (math.ceil(NUM_TRAIN / 4), NUM_TRAIN - math.ceil(NUM_TRAIN / 4))}
    assert len(splits.load_val(layout, str(tmp_path / "made"))) == NUM_VAL
    # every mask holds classes 0..149 and 255; a value of 150 is bad input naming the file
    res = scan.scan_examples(train + val, num_classes=150, exif=False)
    assert not res.problems and len(res.good) == NUM_TRAIN + NUM_VAL
    bad = tmp_path / "bad.png"
    bad.write_bytes(decode.encode_png(np.full((8, 8), 150, np.uint8)))
    with pytest.raises(bad_input.BadInputError, match=r"bad\.png.*150"):
        decode.decode_mask(bad.read_bytes(), str(bad), num_classes=150)


def test_original_annotations_are_refused_and_mapped(tmp_path):
    root = write_ade20k(str(tmp_path), original=True)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        readers.Ade20kLayout(root)
    mask = np.array([[0, 1, 150], [255, 2, 0]], np.uint8)
    np.testing.assert_array_equal(readers.reduce_zero_label(mask), [[255, 0, 149], [255, 1, 255]])
    # mapped, the folder is V2's form again, and readable
    layout = readers.Ade20kLayout(root, check_annotations=False)
    for e in layout.subset("training") + layout.subset("validation"):
        original = decode.decode_mask(open(e.mask, "rb").read(), e.mask)
        io.write_bytes_atomic(e.mask, decode.encode_png(readers.reduce_zero_label(original)))
    assert readers.Ade20kLayout(root).root == root


def test_tfds_build(ade_root, tmp_path):
    out = tfds_builders.build("ade20k", ade_root, str(tmp_path / "tfds"))
    meta = tfds_builders.read_metadata(out)
    layout = readers.Ade20kLayout(ade_root)
    assert meta["names"]["training"] == [e.name for e in layout.subset("training")]
    assert meta["names"]["validation"] == [e.name for e in layout.subset("validation")] and meta["num_classes"] == 150


def _config(root: str, splits_dir: str, workdir: str, pseudo_labels: str):
    spec = importlib.util.spec_from_file_location("ade20k_v2_config", os.path.join(REPO, "configs", "ade20k_v2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("split=1_4,mode=zsp")
    c.workdir = workdir
    c.data.update(root=root, splits_dir=splits_dir, source="folder", workers=0, pseudo_labels=pseudo_labels)
    c.train.update(crop_size=56, batch_size=2)
    return c


def test_v2_pipeline_has_no_mix_stream_and_shifts_the_labellers_maps(ade_root, tmp_path):
    """The labeller's maps of ADE20K hold 0 (background, which ADE20K has not) and 1..150; the V2 pipeline moves them
    to 255 and 0..149 and draws no CutMix mix stream."""
    lists = _v2_lists(ade_root, str(tmp_path / "splits"))
    layout = readers.Ade20kLayout(ade_root)
    _, unlabeled = splits.load_split(layout, lists, "1_4")
    labels_dir = str(tmp_path / "labels")
    values = {}
    for k, e in enumerate(unlabeled):  # one labeller value per map: 0 (background), 1 or 150
        h, w = decode.image_size(e.image)
        values[e.name] = (0, 1, 150)[k % 3]
        io.write_bytes_atomic(os.path.join(labels_dir, os.path.splitext(e.name)[0] + ".png"),
                              decode.encode_png(np.full((h, w), values[e.name], np.uint8)))
    c = _config(ade_root, lists, str(tmp_path / "work"), labels_dir)
    data_config.validate(c)
    srcs = data_inputs.training_sources(c, pseudo_labels=labels_dir)
    assert not srcs.problems and len(srcs.unlabeled) == NUM_TRAIN - 2
    pipeline = data_inputs.make_train_pipeline(c, srcs)
    seen = set()
    for batch, _ in zip(pipeline, range(3)):
        assert set(batch) == {"labeled", "unlabeled"}  # V2: the partner is the flipped batch
        label, ignore = batch["unlabeled"]["pseudo_label"], batch["unlabeled"]["ignore_mask"]
        for row in range(label.shape[0]):
            seen |= set(np.unique(label[row][ignore[row] != 255]).tolist())
        assert set(np.unique(label).tolist()) <= set(range(150)) | {255}
    assert seen == {255, 0, 149}  # background -> ignore, 1 -> 0, 150 -> 149
    c.data.num_classes = 151
    with pytest.raises(ValueError, match="data.num_classes=151"):
        data_config.validate(c)

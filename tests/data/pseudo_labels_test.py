"""Pseudo-label maps through the training input: alignment with the image under every augmentation (weak
view, mix stream, CutMix), padding kept apart from "uncovered", bad maps as bad input, segment records."""

from __future__ import annotations

import os

import cv2
import grain
import jax
import numpy as np
import pytest

from zsp_jax.data import augment, bad_input, decode, device_augment, pipeline, pseudo_labels, readers, sources, synthetic
from zsp_jax.train.step import cutmix_images, cutmix_targets

CROP, BATCH, NUM_CLASSES = 48, 4, 21
UNCOVERED_COLOUR = np.array([128, 128, 128], np.uint8)


def _colours() -> np.ndarray:
    """(256, 3) uint8: one colour per class (the VOC palette, brightened so no class is black = padding)."""
    pal = synthetic.voc_palette().astype(np.int32)
    pal = np.clip(pal // 2 + 96, 0, 255).astype(np.uint8)
    pal[255] = UNCOVERED_COLOUR
    return pal


def _blocky_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A label map of large rectangles (classes and 255 = uncovered), so that most pixels are interior."""
    label = np.full((h, w), int(rng.integers(0, NUM_CLASSES)), np.uint8)
    for _ in range(4):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        bh, bw = int(rng.integers(8, h // 2 + 9)), int(rng.integers(8, w // 2 + 9))
        label[y:y + bh, x:x + bw] = 255 if rng.random() < 0.3 else int(rng.integers(0, NUM_CLASSES))
    return label


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """12 unlabelled PNG images painted from their pseudo-label maps (colour = class), 4 labelled ones.

    Sizes span smaller than the crop (padding) to twice it (downscaling)."""
    root = tmp_path_factory.mktemp("painted")
    rng = np.random.default_rng(0)
    colours = _colours()
    labels_dir = str(root / "pseudo")

    def example(name: str, labelled: bool) -> readers.Example:
        h, w = (int(v) for v in rng.integers(CROP // 2, 2 * CROP + 1, 2))
        label = _blocky_map(rng, h, w)
        image_path = str(root / "images" / f"{name}.png")
        os.makedirs(os.path.dirname(image_path), exist_ok=True)
        with open(image_path, "wb") as f:
            f.write(decode.encode_png(colours[label]))
        if labelled:
            mask_path = str(root / "masks" / f"{name}.png")
            os.makedirs(os.path.dirname(mask_path), exist_ok=True)
            with open(mask_path, "wb") as f:
                f.write(decode.encode_png(np.where(label == 255, 0, label).astype(np.uint8)))
            return readers.Example(f"images/{name}.png", image_path, mask_path)
        out = pseudo_labels.label_path(labels_dir, f"images/{name}.png")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(decode.encode_png(label, synthetic.voc_palette()))
        return readers.Example(f"images/{name}.png", image_path, None)

    labelled = [example(f"l{i}", True) for i in range(4)]
    unlabelled = [example(f"u{i}", False) for i in range(12)]
    return labelled, unlabelled, labels_dir


def _pipe(painted, **kw):
    labelled, unlabelled, labels_dir = painted
    args = dict(crop_size=CROP, global_batch_size=BATCH, seed=0, num_classes=NUM_CLASSES, workers=0, read_threads=1,
                shard=grain.sharding.ShardOptions(0, 1))
    args.update(kw)
    return pipeline.TrainPipeline(sources.FileSource(labelled),
                                  pseudo_labels.WithPseudoLabels(sources.FileSource(unlabelled), labels_dir), **args)


def _interior(label: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood lies inside the view and holds one label value: bilinear
    (anti-aliased) resizing of the image cannot mix colours there. (Near the crop's edge the image
    may blend in pixels from outside the crop, whose labels the view does not show.)"""
    k = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    framed = np.pad(label.astype(np.uint8), radius, constant_values=254)  # 254: never a label value
    lo, hi = cv2.erode(framed, k), cv2.dilate(framed, k)
    return (lo == hi)[radius:-radius, radius:-radius]


def _check_view(image: np.ndarray, label: np.ndarray, ignore: np.ndarray) -> tuple[int, int]:
    """Asserts one (S, S) view is aligned; returns (interior pixels checked, padding pixels)."""
    colours = _colours()
    pad = ignore == 255
    assert set(np.unique(ignore)) <= {0, 255}
    assert np.all(label[pad] == 255) and np.all(image[pad] == 0)  # padding: black image, label 255
    inside = _interior(label) & ~pad & _interior(pad.astype(np.uint8))
    diff = np.abs(image[inside].astype(np.int32) - colours[label[inside]].astype(np.int32)).max(initial=0)
    assert diff <= 2, diff  # the image shows its label's colour (uncovered 255: the grey)
    return int(inside.sum()), int(pad.sum())


@pytest.mark.parametrize("strong, mix_same", [("device", True), ("host", False)])
def test_pseudo_labels_stay_aligned_with_every_augmented_view(painted, strong, mix_same):
    pipe = _pipe(painted, strong_on_host=strong == "host", mix_same_images=mix_same)
    it = iter(pipe)
    finalize = jax.jit(device_augment.finalize)
    checked = padded = uncovered = mixed = 0
    for _ in range(pipe.steps_per_epoch):
        host = next(it)
        for stream in ("unlabeled", "unlabeled_mix"):
            u = host[stream]
            assert u["pseudo_label"].shape == (BATCH, CROP, CROP) and u["pseudo_label"].dtype == np.uint8
            for b in range(BATCH):
                n, p = _check_view(u["image"][b], u["pseudo_label"][b], u["ignore_mask"][b])
                checked, padded = checked + n, padded + p
                uncovered += int(np.sum((u["pseudo_label"][b] == 255) & (u["ignore_mask"][b] == 0)))
        # CutMix as the train step does it, on the finalized (normalised) weak views of both streams.
        out = jax.tree.map(np.asarray, finalize(host))
        unl, mix = out["unlabeled"], out["unlabeled_mix"]
        for key in ("cutmix_box1", "cutmix_box2"):
            box = unl[key]
            image = np.asarray(cutmix_images(unl["image_w"], mix["image_w"], box))
            label, ignore = (np.asarray(a) for a in cutmix_targets(box, (unl["pseudo_label"], mix["pseudo_label"]),
                                                                   (unl["ignore_mask"], mix["ignore_mask"])))
            raw = np.clip(np.rint((image * augment.STD + augment.MEAN) * 255), 0, 255).astype(np.uint8)
            for b in range(BATCH):
                # Inside the box the pixels (and their labels) come from the mix image; away from the box
                # edges every interior pixel still shows its label's colour.
                edge = _interior(box[b].astype(np.uint8))
                lab = np.where(edge, label[b], 255).astype(np.uint8)
                _check_view(np.where(edge[..., None], raw[b], 0), lab, np.where(edge, ignore[b], 255))
                mixed += int(box[b].sum())
    if hasattr(it, "close"):
        it.close()
    # The comparison had something to compare: many interior pixels, padding, uncovered pixels, boxes.
    assert checked > 0.3 * 2 * pipe.steps_per_epoch * BATCH * CROP * CROP
    assert padded > 0 and uncovered > 0 and mixed > 0


def test_weak_view_without_a_map_draws_the_same_geometry():
    """The map rides along with the random draws of the plain weak view (same crop, flip, scale)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)
    label = rng.integers(0, NUM_CLASSES, (40, 70)).astype(np.uint8)
    padded = 0
    for seed in range(8):
        a = augment.unlabeled_weak_view(image, label, CROP, np.random.default_rng(seed))
        b = augment.unlabeled_weak_view(image, None, CROP, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert b[2] is None and np.all(a[2][a[1] == 255] == 255)
        padded += int(np.any(a[1] == 255))
    assert padded  # some draws shrink the image below the crop


def _map_example(tmp_path, name, label, image_size):
    image_path = str(tmp_path / f"{name}.png")
    with open(image_path, "wb") as f:
        f.write(decode.encode_png(np.zeros(image_size + (3,), np.uint8)))
    labels_dir = str(tmp_path / "labels")
    if label is not None:
        os.makedirs(labels_dir, exist_ok=True)
        with open(pseudo_labels.label_path(labels_dir, f"{name}.png"), "wb") as f:
            f.write(label)
    return readers.Example(f"{name}.png", image_path, None), labels_dir


@pytest.mark.parametrize("case, reason", [
    ("missing", "missing"), ("mis-sized", "differs from its image"), ("out of range", "30"),
    ("colour", "channel")])
def test_bad_maps_are_bad_input_naming_the_map(tmp_path, case, reason):
    good = decode.encode_png(np.zeros((20, 30), np.uint8))
    data = {"missing": None, "mis-sized": decode.encode_png(np.zeros((21, 30), np.uint8)),
            "out of range": decode.encode_png(np.full((20, 30), 30, np.uint8)),
            "colour": decode.encode_png(np.zeros((20, 30, 3), np.uint8))}[case]
    ok_ex, labels_dir = _map_example(tmp_path, "ok", good, (20, 30))
    bad_ex, _ = _map_example(tmp_path, "bad", data, (20, 30))
    names, problems = pseudo_labels.check_pseudo_labels([ok_ex, bad_ex], labels_dir, num_classes=NUM_CLASSES)
    assert names == ["ok.png"]
    assert len(problems) == 1 and problems[0].path.endswith(os.path.join("labels", "bad.png"))
    assert reason in problems[0].reason, problems[0].reason
    with pytest.raises(bad_input.BadInputError, match="bad.png"):
        bad_input.raise_for(problems, "split")


def test_a_map_that_breaks_during_training_is_blanked_or_raises(painted, tmp_path):
    labelled, unlabelled, _ = painted
    empty = str(tmp_path / "empty")  # no maps at all: every record carries b""
    source = pseudo_labels.WithPseudoLabels(sources.FileSource(unlabelled), empty)
    with pytest.raises(bad_input.BadInputError):
        pipeline.TrainTransform(CROP, num_classes=NUM_CLASSES)((sources.FileSource(labelled)[0], source[0]),
                                                               np.random.default_rng(0))
    out = pipeline.TrainTransform(CROP, num_classes=NUM_CLASSES, on_bad_input="skip")(
        (sources.FileSource(labelled)[0], source[0]), np.random.default_rng(0))
    assert np.all(out["unlabeled"]["ignore_mask"] == 255) and np.all(out["unlabeled"]["pseudo_label"] == 255)


def test_segment_records_round_trip_to_the_map(tmp_path):
    """``synthetic.make_pseudo_labels`` writes maps and per-segment records as the labeller does; the reader
    decodes the records back into the map (largest first, small ones painted over)."""
    root = str(tmp_path / "VOC2012")
    synthetic.make_voc_like(root, num_train=4, num_val=0, size_range=(48, 64), seed=3)
    examples = readers.VocLayout(root).subset("train")
    stats = synthetic.make_pseudo_labels(examples, str(tmp_path / "pl" / "labels"), num_classes=NUM_CLASSES,
                                         corrupt_fraction=0.5, uncovered_fraction=0.2, seed=0,
                                         segments_dir=str(tmp_path / "pl" / "segments"))
    assert stats["corrupted"] > 0 and stats["uncovered"] > 0 and 0 < stats["pixel_accuracy"] < 1
    seg_dir = pseudo_labels.find_segments_dir(str(tmp_path / "pl" / "labels"))
    for ex in examples:
        rec = pseudo_labels.read_segments(seg_dir, ex.name)
        masks = pseudo_labels.segment_masks(rec)
        painted = np.full(masks.shape[1:], 255, np.uint8)
        for k in np.argsort([-s["area"] for s in rec["segments"]], kind="stable"):
            painted[masks[k]] = rec["segments"][k]["class"]
        with open(pseudo_labels.label_path(str(tmp_path / "pl" / "labels"), ex.name), "rb") as f:
            np.testing.assert_array_equal(painted, decode.decode_mask(f.read()))

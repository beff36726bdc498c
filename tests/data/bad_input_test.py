"""Item 5: every kind of bad or unusual input gives a clear error naming the file, is converted, or is
skipped and reported, as config.data.on_bad_input chooses."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from zsp_jax.data import bad_input, decode, inputs, readers, scan, splits
from zsp_jax.data.bad_input import BadInputError
from tests.fixtures import data_files


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("make, reason", [
    (data_files.zero_byte, "empty file"),
    (data_files.truncated_jpeg, "cannot decode"),
    (data_files.not_an_image, "cannot decode"),
])
def test_undecodable_images_name_the_file(tmp_path, make, reason):
    path = make(str(tmp_path / "img.jpg"))
    with pytest.raises(BadInputError, match=reason) as e:
        decode.decode_image(_read(path), path)
    assert e.value.path == path and path in str(e.value)


def test_grayscale_rgba_16bit_cmyk_become_rgb(tmp_path):
    ref = data_files.rgb_array()
    gray = decode.decode_image(_read(data_files.gray_jpeg(str(tmp_path / "g.jpg"))))
    assert gray.shape == ref.shape and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(gray[..., 0].astype(int) - ref[..., 1]).mean() < 3

    rgba = decode.decode_image(_read(data_files.rgba_png(str(tmp_path / "a.png"))))
    np.testing.assert_array_equal(rgba, ref)  # alpha dropped, as Image.convert("RGB") in the reference

    p16 = data_files.gray16_png(str(tmp_path / "w.png"))
    assert Image.open(p16).mode.startswith("I")  # really stored with 16-bit samples
    wide = decode.decode_image(_read(p16))
    np.testing.assert_array_equal(wide[..., 0], ref[..., 0])  # v * 257 -> v, not clipped to white

    pc = data_files.cmyk_jpeg(str(tmp_path / "c.jpg"))
    assert Image.open(pc).mode == "CMYK"
    cmyk = decode.decode_image(_read(pc))
    assert cmyk.shape == ref.shape and np.abs(cmyk.astype(int) - ref).mean() < 6


def test_exif_orientation(tmp_path):
    path = data_files.exif_rotated_jpeg(str(tmp_path / "r.jpg"), h=40, w=56, orientation=6)
    stored = decode.decode_image(_read(path), exif=False)
    shown = decode.decode_image(_read(path), exif=True)
    assert stored.shape == (40, 56, 3) and shown.shape == (56, 40, 3)
    # orientation 6 = rotate 90 degrees clockwise for display
    assert np.abs(shown.astype(int) - np.rot90(stored, k=-1)).max() <= 1
    # Plain folders apply it; annotated layouts keep the stored pixels (masks are aligned to them).
    ex = readers.folder_examples(str(tmp_path))[0]
    res = scan.scan_examples([ex], num_classes=None, exif=True)
    assert res.sizes[ex.name] == (56, 40)


def test_bad_masks_name_the_file(tmp_path):
    good = np.zeros((40, 56), np.uint8)
    good[5:10, 5:10] = 20
    good[0] = 255
    p = data_files.mask_png(str(tmp_path / "ok.png"), good)
    np.testing.assert_array_equal(decode.decode_mask(_read(p), p, num_classes=21), good)

    bad = good.copy()
    bad[20, 20] = 37
    p = data_files.mask_png(str(tmp_path / "label37.png"), bad)
    with pytest.raises(BadInputError, match=r"label values \[37\] outside 0..20") as e:
        decode.decode_mask(_read(p), p, num_classes=21)
    assert e.value.path == p

    p = data_files.rgb_mask_png(str(tmp_path / "colour.png"))
    with pytest.raises(BadInputError, match="mode RGB") as e:
        decode.decode_mask(_read(p), p)
    assert e.value.path == p

    with pytest.raises(BadInputError, match="differs from its image") as e:
        decode.check_same_size(np.zeros((40, 50, 3), np.uint8), good, "m.png")
    assert e.value.path == "m.png"


def _plant_bad_split(root: str, split_dir: str) -> dict[str, str]:
    """Writes one bad example of each kind into a VOC copy and a split listing them; returns name -> reason."""
    layout = readers.VocLayout(root)
    train = layout.subset("train")
    img = lambda i: os.path.join(root, train[i].name)  # noqa: E731
    mask = lambda i: train[i].mask  # noqa: E731
    data_files.zero_byte(img(0))
    data_files.truncated_jpeg(img(1))
    m = decode.decode_mask(_read(mask(2)))
    m[0, 0] = 37
    data_files.mask_png(mask(2), m)
    data_files.mask_png(mask(3), decode.decode_mask(_read(mask(3)))[:-3])  # size differs from the image
    expected = {train[0].name: "empty file", train[1].name: "cannot decode", train[2].name: "label values [37]",
                train[3].name: "differs from its image", "JPEGImages/missing_000.jpg": "listed but missing"}
    lab = [(e.name, os.path.relpath(e.mask, root)) for e in train[:6]] + [("JPEGImages/missing_000.jpg", None)]
    pool = layout.subset("train_aug")
    unl = [(e.name, None) for e in pool if e.name not in {n for n, _ in lab}]
    splits.write_split_file(os.path.join(split_dir, "bad", "labeled.txt"), lab)
    splits.write_split_file(os.path.join(split_dir, "bad", "unlabeled.txt"), unl + [("JPEGImages/gone.jpg", None)])
    expected["JPEGImages/gone.jpg"] = "listed but missing"
    return expected


def _config(root, split_dir, tmp_path, source, policy):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = str(tmp_path / f"run_{source}_{policy}")
    c.data = dict(dataset="voc", num_classes=21, root=root, splits_dir=split_dir, split="bad", source=source,
                  tfds_dir=str(tmp_path / f"tfds_{policy}"), unlabeled_dir="", on_bad_input=policy,
                  strong_aug="device", mix_same_images=True, workers=0, read_threads=1)
    c.train = dict(batch_size=2, crop_size=32)
    c.data_stage = dict(num_batches=0, preview_images=0)
    return c


@pytest.mark.parametrize("source", ["folder", "tfds"])
def test_policy_skip_reports_and_error_names_every_file(voc_copy, tmp_path, source):
    split_dir = str(tmp_path / "splits")
    expected = _plant_bad_split(voc_copy, split_dir)

    cfg = _config(voc_copy, split_dir, tmp_path, source, "skip")
    os.makedirs(cfg.workdir)
    srcs = inputs.training_sources(cfg)
    got = {p.name: p.reason for p in srcs.problems}
    if source == "tfds":
        # The build checks the whole train_aug pool; split entries that are not in the build are reported.
        assert set(got) == set(expected)
    for name, reason in expected.items():
        assert reason in got[name], (name, got[name])
    assert len(srcs.labeled) == 2  # 6 listed + 1 missing, 5 bad
    assert len(srcs.unlabeled) == len(readers.VocLayout(voc_copy).subset("train_aug")) - 6
    path = os.path.join(cfg.workdir, "bad_input.json")
    bad_input.write_report(path, srcs.problems, "test")
    report = json.load(open(path))
    assert report["count"] == len(expected) and {r["name"] for r in report["skipped"]} == set(expected)

    cfg = _config(voc_copy, split_dir, tmp_path, source, "error")
    os.makedirs(cfg.workdir)
    with pytest.raises(BadInputError) as e:
        inputs.training_sources(cfg)
    msg = str(e.value)
    assert "on_bad_input='skip'" in msg
    for name in list(expected)[:4]:
        assert os.path.basename(name)[:-4] in msg  # the offending image or mask file is named
    if source == "folder":  # (the TFDS build stops first, on the bad files of the pool)
        assert "missing_000.jpg" in msg and "gone.jpg" in msg


def test_scan_cache_reuses_and_notices_changes(voc_copy, tmp_path):
    layout = readers.VocLayout(voc_copy)
    ex = layout.subset("train")[:3]
    cache = str(tmp_path / "scan.json")
    first = scan.scan_examples(ex, num_classes=21, cache_path=cache)
    assert not first.problems and len(first.good) == 3
    data_files.zero_byte(ex[1].image)  # the file changes: its cache entry no longer matches
    second = scan.scan_examples(ex, num_classes=21, cache_path=cache)
    assert [p.name for p in second.problems] == [ex[1].name] and "empty" in second.problems[0].reason
    third = scan.scan_examples(ex, num_classes=21, cache_path=cache)  # cached failure keeps path and reason
    assert third.problems == second.problems

import os

import pytest

from zsp_jax.data import readers, splits

from .conftest import NUM_AUG, NUM_TRAIN


def test_split_file_round_trip(tmp_path):
    pairs = [("JPEGImages/a.jpg", "SegmentationClass/a.png"), ("JPEGImages/b.jpg", None),
             ("train2017/000000000009.jpg", "masks/000000000009.png")]
    path = str(tmp_path / "s" / "labeled.txt")
    splits.write_split_file(path, pairs)
    assert open(path).read().splitlines()[0] == "JPEGImages/a.jpg SegmentationClass/a.png"
    assert splits.read_split_file(path) == pairs


def test_split_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("JPEGImages/a.jpg SegmentationClass/a.png\n\nx y z\n")
    with pytest.raises(ValueError, match=r"bad.txt:3"):
        splits.read_split_file(str(bad))
    with pytest.raises(FileNotFoundError, match="make_splits"):
        splits.read_split_file(str(tmp_path / "none.txt"))


def test_labeled_count_matches_unimatch_sizes():
    assert splits.labeled_count("1_16", 10582) == 662
    assert splits.labeled_count("1_8", 10582) == 1323
    assert splits.labeled_count("1_4", 10582) == 2646
    assert splits.labeled_count("1_512", 118287) == 232
    assert splits.labeled_count("1_32", 118287) == 3697
    assert splits.labeled_count("92", 10582) == 92
    with pytest.raises(ValueError):
        splits.labeled_count("half", 10)


def test_make_split_properties(voc_root):
    layout = readers.VocLayout(voc_root)
    pool, train = layout.subset("train_aug"), layout.subset("train")
    lab, unl = splits.make_split(pool, "4", seed=0, candidates=train)
    assert len(lab) == 4 and len(unl) == len(pool) - 4
    assert {e.name for e in lab} <= {e.name for e in train}  # counts come from VOC train
    assert {e.name for e in lab} | {e.name for e in unl} == {e.name for e in pool}
    assert not {e.name for e in lab} & {e.name for e in unl}
    assert splits.make_split(pool, "4", seed=0, candidates=train) == (lab, unl)  # seeded
    assert splits.make_split(pool, "4", seed=1, candidates=train)[0] != lab or len(train) == 4
    lab_f, _ = splits.make_split(pool, "1_4", seed=0, candidates=train)
    assert len(lab_f) == (NUM_TRAIN + NUM_AUG + 3) // 4
    with pytest.raises(ValueError, match="only"):
        splits.make_split(pool, str(NUM_TRAIN + 1), seed=0, candidates=train)


def test_make_splits_write_and_load(voc_root, voc_splits):
    layout = readers.VocLayout(voc_root)
    lab, unl = splits.load_split(layout, voc_splits, "4")
    assert len(lab) == 4 and len(unl) == NUM_TRAIN + NUM_AUG - 4
    assert all(e.mask and os.path.isfile(e.mask) for e in lab) and all(e.mask is None for e in unl)
    first = open(os.path.join(voc_splits, "4", "labeled.txt")).readline().split()
    assert first[0].startswith("JPEGImages/") and first[1].startswith("SegmentationClass/")
    assert len(splits.load_val(layout, voc_splits)) == len(layout.subset("val"))


def test_unimatch_lines_fall_back_to_aug_masks(voc_root, tmp_path):
    # UniMatch's lists name SegmentationClass/x.png even for images whose mask is only in
    # SegmentationClassAug in the standard layout.
    layout = readers.VocLayout(voc_root)
    aug_only = [e for e in layout.subset("train_aug") if "SegmentationClassAug" in e.mask]
    d = tmp_path / "splits"
    name = aug_only[0].name
    stem = os.path.basename(name)[:-4]
    splits.write_split_file(str(d / "x" / "labeled.txt"), [(name, f"SegmentationClass/{stem}.png")])
    others = [e.name for e in layout.subset("train_aug") if e.name != name]
    splits.write_split_file(str(d / "x" / "unlabeled.txt"), [(n, None) for n in others])
    lab, unl = splits.load_split(layout, str(d), "x")
    assert lab[0].mask.endswith(f"SegmentationClassAug/{stem}.png")
    assert len(unl) == len(others)


def test_overlapping_split_is_an_error(voc_root, tmp_path):
    layout = readers.VocLayout(voc_root)
    name = layout.subset("train")[0].name
    d = tmp_path / "splits"
    splits.write_split_file(str(d / "x" / "labeled.txt"), [(name, None)])
    splits.write_split_file(str(d / "x" / "unlabeled.txt"), [(name, None)])
    with pytest.raises(ValueError, match="both"):
        splits.load_split(layout, str(d), "x")


def test_make_splits_tool(voc_root, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_splits", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_splits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "out")
    assert tool.main(["--dataset", "voc", "--root", voc_root, "--out", out, "--splits", "2,1_8"]) == 0
    for s in ("2", "1_8"):
        assert os.path.isfile(os.path.join(out, s, "labeled.txt"))
    assert os.path.isfile(os.path.join(out, "val.txt"))

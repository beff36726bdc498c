import os
import pickle
import shutil

import grain
import numpy as np
import pytest

from zsp_jax.data import pipeline, readers, sources, tfds_builders


@pytest.fixture(scope="module")
def voc_build(voc_root, tmp_path_factory) -> str:
    return tfds_builders.build("voc", voc_root, str(tmp_path_factory.mktemp("tfds")))


def test_build_then_grain_read_equals_folder_read(voc_root, voc_build):
    layout = readers.VocLayout(voc_root)
    meta = tfds_builders.read_metadata(voc_build)
    assert meta["source_root"] == layout.root and meta["num_classes"] == 21
    for subset in ("train_aug", "val"):
        examples = layout.subset(subset)
        assert meta["names"][subset] == [e.name for e in examples] and meta["skipped"][subset] == []
        from_tfds = pipeline.eval_dataset(sources.TfdsSource(voc_build, subset), num_classes=21)
        from_files = pipeline.eval_dataset(sources.FileSource(examples), num_classes=21)
        assert len(from_tfds) == len(from_files) == len(examples)
        for a, b in zip(from_tfds, from_files):
            assert a["name"] == b["name"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
    # Raw records are byte-identical too.
    src = sources.TfdsSource(voc_build, "train_aug", [3, 1])
    files = sources.FileSource(layout.subset("train_aug"))
    assert src[0] == files[3] and src[1] == files[1]


def test_tfds_source_subsets_pickles_and_drops_masks(voc_build):
    src = sources.TfdsSource(voc_build, "train_aug", [2, 0], labeled=False)
    assert len(src) == 2 and src[0]["mask"] == b""
    _ = src[1]  # opened
    clone = pickle.loads(pickle.dumps(src))  # as sent to Grain workers
    assert clone[0] == src[0]


def test_build_is_reused_and_checks_its_root(voc_root, voc_build, tmp_path):
    tfds_dir = os.path.dirname(os.path.dirname(voc_build))
    stamp = os.path.getmtime(os.path.join(voc_build, "dataset_info.json"))
    assert tfds_builders.build("voc", voc_root, tfds_dir) == voc_build
    assert os.path.getmtime(os.path.join(voc_build, "dataset_info.json")) == stamp
    other = str(tmp_path / "VOC2012")
    shutil.copytree(voc_root, other)
    with pytest.raises(ValueError, match="made from"):
        tfds_builders.build("voc", other, tfds_dir)


def test_stale_build_is_detected(voc_copy, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    out = tfds_builders.build("voc", voc_copy, tfds_dir)
    first = readers.VocLayout(voc_copy).subset("train_aug")[0]
    os.remove(first.image)  # listed (its mask is still there) but gone
    with pytest.raises(ValueError, match="out of date"):
        tfds_builders.build("voc", voc_copy, tfds_dir)
    assert tfds_builders.build("voc", voc_copy, tfds_dir, rebuild_if_stale=True, on_bad_input="skip") == out
    meta = tfds_builders.read_metadata(out)
    assert first.name not in meta["names"]["train_aug"]
    assert meta["skipped"]["train_aug"] == [[first.name, first.image, "listed but missing"]]


def test_eval_dataset_shards_cover_every_example_once(voc_build):
    src = sources.TfdsSource(voc_build, "train_aug")
    names = []
    for p in range(3):  # 16 examples over 3 simulated processes: uneven shares are fine for evaluation
        ds = pipeline.eval_dataset(src, shard=grain.sharding.ShardOptions(p, 3))
        names += [e["name"] for e in ds]
    assert sorted(names) == sorted(src[i]["name"] for i in range(len(src)))


def _build_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_tfds", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "build_tfds.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_build_tool_builds_reuses_and_names_a_stale_build(voc_copy, tmp_path, capsys):
    tool = _build_tool()
    tfds_dir = str(tmp_path / "tfds")
    assert tool.main(["--dataset", "voc", "--root", voc_copy, "--tfds-dir", tfds_dir]) == 0
    out = capsys.readouterr().out
    assert tfds_builders.is_built("voc", tfds_dir) and "train_aug: 16 examples" in out
    os.remove(readers.VocLayout(voc_copy).subset("train_aug")[0].image)
    assert tool.main(["--dataset", "voc", "--root", voc_copy, "--tfds-dir", tfds_dir]) == 2
    assert "out of date" in capsys.readouterr().err
    assert tool.main(["--dataset", "voc", "--root", voc_copy, "--tfds-dir", tfds_dir, "--rebuild-if-stale",
                      "--on-bad-input", "skip"]) == 0
    assert "listed but missing" in capsys.readouterr().out
    assert tool.main(["--dataset", "voc", "--root", str(tmp_path / "nowhere"), "--tfds-dir", tfds_dir]) == 2
    assert "nowhere" in capsys.readouterr().err

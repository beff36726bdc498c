import json
import os
import subprocess
import sys

import numpy as np
import pytest

from zsp_jax.data import classes, coco, decode, readers, scan, tfds_builders
from tests.fixtures import data_files


def _poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images = [{"id": 9, "file_name": "000000000009.jpg", "height": 40, "width": 60},
              {"id": 25, "file_name": "000000000025.jpg", "height": 30, "width": 20}]
    crowd_rle = {"counts": [40 * 50, 40 * 5, 40 * 5], "size": [40, 60]}  # columns 50..54 (column-major RLE)
    anns = [
        {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 30 * 40.0,
         "segmentation": _poly(2, 2, 42, 32), "bbox": [2, 2, 40, 30]},        # person, large
        {"id": 2, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": 10 * 10.0,
         "segmentation": _poly(10, 10, 20, 20), "bbox": [10, 10, 10, 10]},    # dog, small, on top
        {"id": 3, "image_id": 9, "category_id": 90, "iscrowd": 1, "area": 200.0,
         "segmentation": crowd_rle, "bbox": [50, 0, 5, 40]},                  # toothbrush crowd
    ]
    cats = [{"id": cid, "name": name} for cid, name in zip(classes.COCO_CATEGORY_IDS, classes.COCO_CLASSES[1:])]
    os.makedirs(root / "annotations")
    for subset in ("train", "val"):
        with open(root / "annotations" / f"instances_{subset}2017.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
        for im in images:
            data_files.mask_png(str(root / f"{subset}2017" / im["file_name"]),
                                np.zeros((im["height"], im["width"]), np.uint8))  # any decodable image
    return root


def test_class_table():
    lut = coco.category_to_class()
    assert lut[1] == 1 and lut[18] == classes.COCO_CLASSES.index("dog") and lut[90] == 80
    assert classes.COCO_CLASSES[0] == "background" and len(classes.VOC_CLASSES) == 21


@pytest.mark.parametrize("crowd", ["ignore", "class"])
def test_masks_from_instances(coco_root, tmp_path, crowd):
    out = tmp_path / "masks"
    n = coco.write_masks(str(coco_root / "annotations" / "instances_train2017.json"), str(out), crowd=crowd,
                         workers=1)
    assert n == 2
    m = decode.decode_mask(open(out / "000000000009.png", "rb").read(), num_classes=81)
    assert m.shape == (40, 60)
    assert m[25, 30] == 1 and m[15, 15] == 17 and m[38, 5] == 0  # person, dog on top, background
    assert m[20, 52] == (255 if crowd == "ignore" else 80)
    empty = decode.decode_mask(open(out / "000000000025.png", "rb").read())
    assert empty.shape == (30, 20) and not empty.any()
    stamp = os.path.getmtime(out / "000000000009.png")
    coco.write_masks(str(coco_root / "annotations" / "instances_train2017.json"), str(out), workers=1)
    assert os.path.getmtime(out / "000000000009.png") == stamp  # resumable: existing masks kept


def test_prepare_coco_tool_then_layout_and_build(coco_root, tmp_path):
    # As users run it: its own process. The tool forks its workers, which is safe there (JAX is
    # not started) but not inside this test process, whose JAX runtime threads are running.
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "prepare_coco.py")
    run = subprocess.run([sys.executable, tool, "--root", str(coco_root), "--workers", "2"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    layout = readers.CocoLayout(str(coco_root))
    train = layout.subset("train")
    assert [e.name for e in train] == ["train2017/000000000009.jpg", "train2017/000000000025.jpg"]
    assert not scan.scan_examples(train, num_classes=81).problems
    build = tfds_builders.build("coco", str(coco_root), str(tmp_path / "tfds"))
    assert tfds_builders.read_metadata(build)["names"]["train"] == [e.name for e in train]

import os

import numpy as np
import pytest

from zsp_jax.data import decode, readers
from tests.fixtures import data_files

from .conftest import NUM_AUG, NUM_TRAIN, NUM_VAL


def test_voc_subsets(voc_root):
    layout = readers.VocLayout(voc_root)
    train, val, aug = layout.subset("train"), layout.subset("val"), layout.subset("train_aug")
    assert (len(train), len(val), len(aug)) == (NUM_TRAIN, NUM_VAL, NUM_TRAIN + NUM_AUG)
    assert not {e.name for e in aug} & {e.name for e in val}
    assert {e.name for e in train} <= {e.name for e in aug}
    for e in aug:
        assert e.name.startswith("JPEGImages/") and e.image == os.path.join(layout.root, e.name)
        assert os.path.isfile(e.mask)
    # Fine masks (SegmentationClass) are preferred; aug-only images fall back to SegmentationClassAug.
    assert all("/SegmentationClass/" in e.mask for e in train)
    assert sum("/SegmentationClassAug/" in e.mask for e in aug) == NUM_AUG
    # The palette PNG (fine) and the grayscale PNG (aug) of one image hold the same indices.
    e = train[0]
    fine = decode.decode_mask(open(e.mask, "rb").read(), num_classes=21)
    augm = decode.decode_mask(open(e.mask.replace("SegmentationClass", "SegmentationClassAug"), "rb").read())
    np.testing.assert_array_equal(fine, augm)


@pytest.mark.parametrize("parent", ["", "VOCdevkit"])
def test_voc_root_forms(voc_root, tmp_path, parent):
    top = tmp_path / "data"
    target = top / parent / "VOC2012" if parent else top / "VOC2012"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(voc_root, target)
    assert readers.VocLayout(str(top)).root == str(target)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        readers.VocLayout(str(tmp_path / "nowhere"))


def test_voc_train_aug_needs_sbd(voc_copy):
    import shutil

    shutil.rmtree(os.path.join(voc_copy, "SegmentationClassAug"))
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        readers.VocLayout(voc_copy).subset("train_aug")


def test_coco_layout(tmp_path):
    root = tmp_path / "coco"
    for sub, n in (("train2017", 3), ("val2017", 2)):
        for i in range(n):
            stem = f"{sub[:1]}{i:011d}"
            data_files.mask_png(str(root / sub / f"{stem}.jpg"), np.zeros((4, 4)))  # content irrelevant here
            data_files.mask_png(str(root / "masks" / f"{stem}.png"), np.zeros((4, 4)))
    layout = readers.CocoLayout(str(root))
    train = layout.subset("train")
    assert [e.name for e in train] == [f"train2017/t{i:011d}.jpg" for i in range(3)]
    assert all(e.mask == str(root / "masks" / (os.path.basename(e.name)[:-4] + ".png")) for e in train)
    assert len(layout.subset("val")) == 2


def test_folder_reader(tmp_path):
    root = tmp_path / "photos"
    data_files.gray_jpeg(str(root / "b.jpg"))
    data_files.rgba_png(str(root / "a" / "c.PNG"))
    data_files.gray16_png(str(root / "a" / "deep" / "d.png"))
    data_files.rgba_png(str(root / "b.png"))  # same stem, other extension: a distinct example
    data_files.not_an_image(str(root / "notes.txt"))
    data_files.gray_jpeg(str(root / ".hidden" / "x.jpg"))
    data_files.gray_jpeg(str(root / ".y.jpg"))
    ex = readers.folder_examples(str(root))
    assert [e.name for e in ex] == ["b.jpg", "b.png", "a/c.PNG", "a/deep/d.png"]
    assert all(e.mask is None and os.path.isfile(e.image) for e in ex)
    with pytest.raises(FileNotFoundError):
        readers.folder_examples(str(tmp_path / "missing"))

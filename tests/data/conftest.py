"""Fixtures of the data-layer tests: small generated datasets in the VOC layout."""

from __future__ import annotations

import shutil

import pytest

from zsp_jax.data import readers, splits, synthetic

NUM_TRAIN, NUM_VAL, NUM_AUG = 12, 4, 4


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> str:
    """A read-only VOC-layout dataset: 12 train + 4 aug-only (train_aug = 16), 4 val, 48-96 px."""
    root = str(tmp_path_factory.mktemp("voc") / "VOC2012")
    synthetic.make_voc_like(root, num_train=NUM_TRAIN, num_val=NUM_VAL, num_aug_only=NUM_AUG,
                            size_range=(48, 96), seed=0)
    return root


@pytest.fixture(scope="session")
def voc_splits(voc_root, tmp_path_factory) -> str:
    """Splits ``4`` (from train) and ``1_4`` (from train_aug) of ``voc_root``, plus val.txt."""
    out = str(tmp_path_factory.mktemp("splits"))
    splits.make_splits(readers.VocLayout(voc_root), out, ["4", "1_4"], seed=0)
    return out


@pytest.fixture
def voc_copy(voc_root, tmp_path) -> str:
    """A writable copy of ``voc_root`` (for tests that plant bad files)."""
    dst = str(tmp_path / "VOC2012")
    shutil.copytree(voc_root, dst)
    return dst


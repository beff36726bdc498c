"""TFDS builders (ArrayRecord, no TensorFlow) for VOC 2012 + SBD, COCO 2017 semantic segmentation and ADE20K.

The manual directory is the dataset root of ``readers.VocLayout`` / ``readers.CocoLayout`` /
``readers.Ade20kLayout``.
Records hold the original encoded files (``image`` JPEG/PNG bytes, ``mask`` PNG bytes), the
example ``name`` (split-file form, ``JPEGImages/x.jpg``) and the image ``height``/``width``. Bytes,
not decoded arrays: TFDS's ``Image`` feature needs TensorFlow to encode arrays, stored originals
are smaller than re-encoded PNGs, and a TFDS read then equals a folder read byte for byte.

Every file is decoded and checked while building (``zsp_jax.data.scan``), so training never
meets a bad record; with ``on_bad_input="skip"`` bad examples are left out and listed in the
build's metadata (``skipped``). Record order is the sorted example order
(``disable_shuffling``), and the metadata holds each split's ``names`` in record order, so a
split file maps onto record indices without reading the records.

Build once with ``build(...)`` or ``tools/build_tfds.py`` (``zsp_jax.main`` builds on first use);
read with ``sources.TfdsSource``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from zsp_jax.data import bad_input, readers, scan
from zsp_jax.data.classes import NUM_CLASSES

VERSION = "1.0.0"
SUBSETS = {"voc": ("train_aug", "val"), "coco": ("train", "val"), "ade20k": ("training", "validation")}


class _SemanticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Encoded image and mask bytes, names in metadata."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the dataset root (see zsp_jax.data.readers) as the manual directory."
    DATASET = ""

    # TFDS looks for a checksums file next to the builder's code through importlib_resources,
    # which is not installed (and there is nothing to download): no code path, no checksums.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def __init__(self, *, on_bad_input: str = "error", threads: int | None = None, **kwargs: Any):
        self._on_bad_input = bad_input.check_policy(on_bad_input)
        self._threads = threads
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DATASET} semantic segmentation: encoded image/mask bytes (zsp_jax).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
                "name": tfds.features.Text(),
                "height": tfds.features.Scalar(dtype=np.int32),
                "width": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        layout = readers.make_layout(self.DATASET, os.fspath(dl_manager.manual_dir))
        self.info.metadata["source_root"] = layout.root
        self.info.metadata["fingerprint"] = fingerprint(layout)
        self.info.metadata["num_classes"] = NUM_CLASSES[self.DATASET]
        self.info.metadata["names"] = {}
        self.info.metadata["skipped"] = {}
        out = {}
        for subset in SUBSETS[self.DATASET]:
            examples = layout.subset(subset)
            res = scan.scan_examples(examples, num_classes=NUM_CLASSES[self.DATASET], exif=layout.exif,
                                     threads=self._threads)
            if self._on_bad_input == "error":
                bad_input.raise_for(res.problems, f"{self.DATASET} {subset} ({layout.root})")
            self.info.metadata["names"][subset] = [e.name for e in res.good]
            self.info.metadata["skipped"][subset] = [[p.name, p.path, p.reason] for p in res.problems]
            out[subset] = self._generate_examples(res.good, res.sizes)
        return out

    def _generate_examples(self, examples: list[readers.Example], sizes: dict[str, tuple[int, int]]):
        for i, ex in enumerate(examples):
            image, mask = ex.read_bytes()
            h, w = sizes[ex.name]
            yield f"{i:08d}", {"image": image, "mask": mask, "name": ex.name, "height": h, "width": w}


class ZspVocAug(_SemanticBuilder):
    """PASCAL VOC 2012 + SBD: splits ``train_aug`` (10,582) and ``val`` (1,449), 21 classes."""

    DATASET = "voc"


class ZspCocoSemantic(_SemanticBuilder):
    """COCO 2017 semantic (81 classes, UniMatch order): splits ``train`` (118,287) and ``val`` (5,000)."""

    DATASET = "coco"


class ZspAde20k(_SemanticBuilder):
    """ADE20K (ADEChallengeData2016 with UniMatch V2's annotations, 150 classes, 255 = other): splits ``training``
    (20,210) and ``validation`` (2,000)."""

    DATASET = "ade20k"


BUILDERS = {"voc": ZspVocAug, "coco": ZspCocoSemantic, "ade20k": ZspAde20k}


def build_dir(dataset: str, tfds_dir: str) -> str:
    """The version directory a build of ``dataset`` under ``tfds_dir`` lives in."""
    return os.path.join(os.path.abspath(tfds_dir), BUILDERS[dataset].name, VERSION)


def is_built(dataset: str, tfds_dir: str) -> bool:
    return os.path.isfile(os.path.join(build_dir(dataset, tfds_dir), "dataset_info.json"))


def fingerprint(layout: readers.Layout) -> str:
    """A digest of every file the build reads (names, sizes, modification times): one ``stat`` per file."""
    h = hashlib.sha256()
    for subset in SUBSETS[layout.dataset]:
        for ex in layout.subset(subset):
            for path in (ex.image, ex.mask):
                try:
                    st = os.stat(path) if path else None
                except OSError:
                    st = None
                h.update(f"{subset}|{path}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build(dataset: str, root: str, tfds_dir: str, *, on_bad_input: str = "error", threads: int | None = None,
          rebuild_if_stale: bool = False) -> str:
    """Builds (once) the ArrayRecord dataset of ``dataset`` from ``root``; returns its version directory.

    A finished build is reused if it was made from the same root and its files have not changed
    since (``fingerprint``); TFDS writes into a temporary directory and renames it when complete,
    so a killed build is redone, never half-used.

    Raises:
      BadInputError: with ``on_bad_input="error"``, listing every bad file.
      ValueError: an existing build was made from another root, or from files that changed since
        (unless ``rebuild_if_stale``, which deletes and rebuilds it).
    """
    out = build_dir(dataset, tfds_dir)
    layout = readers.make_layout(dataset, root)
    if is_built(dataset, tfds_dir):
        meta = read_metadata(out)
        if meta.get("source_root") != layout.root:
            problem = f"was made from {meta.get('source_root')}, not {layout.root}"
        elif meta.get("fingerprint") != fingerprint(layout):
            problem = f"is out of date: files under {layout.root} were added, removed or changed since"
        else:
            return out
        if not rebuild_if_stale:
            raise ValueError(f"the TFDS build in {out} {problem}; delete that directory to rebuild it, or set "
                             f"config.data.tfds_dir to another directory")
        shutil.rmtree(out)
    builder = BUILDERS[dataset](data_dir=os.path.abspath(tfds_dir), file_format="array_record",
                                on_bad_input=on_bad_input, threads=threads)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=layout.root))
    return out


def read_metadata(version_dir: str) -> dict[str, Any]:
    """The build's metadata: ``source_root``, ``fingerprint``, ``num_classes``, ``names`` and ``skipped`` per split."""
    return dict(tfds.builder_from_directory(version_dir).info.metadata)

"""Grain random-access sources of raw records, straight from files or from a TFDS ArrayRecord build.

Both give the same record for the same example: ``{"name": str, "image": bytes, "mask": bytes}``
(the encoded files as they are on disk; ``mask`` is ``b""`` for unlabelled data), and decoding
happens later, in the Grain workers. So a TFDS read equals a folder read byte for byte.

Sources must pickle (Grain sends them to worker processes): they hold paths, not open files.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsp_jax.data.readers import Example

Record = dict[str, Any]

# Grain's prefetch threads open sources concurrently on first access; TFDS's first import is lazy
# (etils lazy modules) and two threads importing it at once deadlock, so sources open one at a time.
_OPEN_LOCK = threading.Lock()


class FileSource:
    """Reads examples' files on access. ``len`` and ``[i]`` as Grain's ``RandomAccessDataSource``."""

    def __init__(self, examples: Sequence[Example]):
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Record:
        ex = self._examples[index]
        image, mask = ex.read_bytes()
        return {"name": ex.name, "image": image, "mask": mask}

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._examples]

    def __repr__(self) -> str:
        return f"FileSource({len(self)} examples)"


class TfdsSource:
    """A subset (by record index) of one split of a TFDS ArrayRecord build, read with ``tfds.data_source``.

    Args:
      data_dir: the build's version directory (``<tfds_dir>/<name>/<version>``).
      split: ``train_aug``/``val`` (VOC) or ``train``/``val`` (COCO).
      indices: record indices to expose, in order; None for all.
      labeled: False drops the stored mask (unlabelled use of labelled records).
    """

    def __init__(self, data_dir: str, split: str, indices: Sequence[int] | None = None, labeled: bool = True):
        self._data_dir = data_dir
        self._split = split
        self._indices = None if indices is None else np.asarray(indices, np.int64)
        self._labeled = labeled
        self._source = None

    def _open(self):
        if self._source is None:
            with _OPEN_LOCK:
                if self._source is None:
                    import tensorflow_datasets as tfds

                    self._source = tfds.builder_from_directory(self._data_dir).as_data_source(split=self._split)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None  # reopened lazily in the worker
        return state

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self._open())

    def __getitem__(self, index: int) -> Record:
        i = int(self._indices[index]) if self._indices is not None else int(index)
        rec = self._open()[i]
        name = rec["name"]
        return {"name": name.decode() if isinstance(name, bytes) else str(name),
                "image": bytes(rec["image"]),
                "mask": bytes(rec["mask"]) if self._labeled else b""}

    def __repr__(self) -> str:
        return f"TfdsSource({self._data_dir}, split={self._split!r}, {len(self)} records)"

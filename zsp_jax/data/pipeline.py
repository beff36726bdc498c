"""Grain input pipelines: the UniMatch training stream and per-image evaluation reads.

Training (``TrainPipeline``), following UniMatch's loaders:

* An epoch is one pass over the unlabelled set; the labelled list is repeated to the unlabelled
  count (the reference's ``nsample``), so both streams have ``n_u`` elements per epoch and
  ``steps_per_epoch = n_u // global_batch`` (the remainder is dropped, as ``drop_last``).
* Each stream is shuffled per epoch with its own seed (Grain's stateless index shuffle, a new
  permutation each epoch), then zipped: element k = (labelled k, unlabelled k).
* The mix stream (the images whose strong views are pasted into the CutMix boxes): the reference
  iterates the same unlabelled loader twice, i.e. the same images in the same order with fresh
  random augmentations. ``mix_same_images=True`` (default) does exactly that and decodes the image
  once for both; ``False`` draws the mix images from a third, independently shuffled stream.
* Per-element work runs in ``TrainTransform``: decode, weak view (resize, crop with padding,
  flip) for every image, and, if ``strong_on_host``, the strong views with PIL; otherwise a
  uint32 ``seed`` per unlabelled view for ``device_augment.finalize``.
* Randomness: Grain's per-element generator, seeded by (seed, global element index): the same
  element gets the same augmentation whatever the worker count, process count or restart.
* Sharding by JAX process: process p takes global elements p, p + P, ... (after the per-epoch
  truncation to a multiple of the global batch), so the processes together see every element of
  an epoch exactly once, like torch's DistributedSampler.
* Workers: ``mp_prefetch`` worker processes each make whole batches; ``read_threads`` threads per
  process run the per-element work (PIL releases the GIL while decoding and resizing).
* Checkpointing: the iterator's ``get_state()``/``set_state()`` (a small JSON-able dict) resumes
  at the same element; ``save_state``/``restore_state`` write and read it atomically.

Batches have static shapes ((B, S, S, ...) with S the crop size), so a jitted train step never
recompiles.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import grain
import jax
import numpy as np

from zsp_jax.data import augment, bad_input, decode
from zsp_jax.utils import io

log = logging.getLogger(__name__)


def _decode_pair(rec: dict[str, Any], exif: bool, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    return decode.decode_pair(rec["image"], rec["mask"], rec["name"], rec["name"] + " (mask)", exif=exif,
                              num_classes=num_classes)


def _plain_arrays(batch: Any) -> Any:
    return jax.tree.map(np.array, batch)


class TrainTransform:
    """Per-element work of the training stream (picklable, runs in Grain workers/threads).

    ``__call__((labelled record, unlabelled record[, mix record]), rng)`` returns the element dict
    documented in ``device_augment.finalize`` (without the batch axis), or None to drop the
    element (a file that fails to decode with ``on_bad_input="skip"``; files are checked before
    training, so this only happens if they change on disk during a run).
    """

    def __init__(self, crop_size: int, *, num_classes: int, strong_on_host: bool = False,
                 exif_labeled: bool = False, exif_unlabeled: bool = False, on_bad_input: str = "error"):
        self.crop_size = crop_size
        self.num_classes = num_classes
        self.strong_on_host = strong_on_host
        self.exif_labeled = exif_labeled
        self.exif_unlabeled = exif_unlabeled
        self.on_bad_input = bad_input.check_policy(on_bad_input)

    def _unlabeled_view(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        img, ignore = augment.weak_view(image, None, self.crop_size, rng)
        out = {"image": img, "ignore_mask": ignore}
        if self.strong_on_host:
            out["image_s1"], out["cutmix_box1"] = augment.strong_view(img, rng)
            out["image_s2"], out["cutmix_box2"] = augment.strong_view(img, rng)
        else:
            out["seed"] = np.uint32(rng.integers(0, 2**32, dtype=np.uint64))
        return out

    def __call__(self, element: tuple[dict[str, Any], ...], rng: np.random.Generator) -> dict[str, Any] | None:
        try:
            lab_img, lab_mask = _decode_pair(element[0], self.exif_labeled, self.num_classes)
            if lab_mask is None:
                raise bad_input.BadInputError(element[0]["name"], "labelled example has no mask")
            unl_img, _ = _decode_pair({**element[1], "mask": b""}, self.exif_unlabeled, None)
            mix_img = unl_img
            if len(element) > 2:
                mix_img, _ = _decode_pair({**element[2], "mask": b""}, self.exif_unlabeled, None)
        except bad_input.BadInputError as e:
            if self.on_bad_input == "error":
                raise
            log.warning("skipping bad input during training: %s", e)
            return None
        img, mask = augment.weak_view(lab_img, lab_mask, self.crop_size, rng)
        return {"labeled": {"image": img, "mask": mask},
                "unlabeled": self._unlabeled_view(unl_img, rng),
                "unlabeled_mix": self._unlabeled_view(mix_img, rng)}


class TrainPipeline:
    """The UniMatch training input of one process (see the module docstring).

    Args:
      labeled / unlabeled: Grain random-access sources of records (``sources.FileSource`` or
        ``sources.TfdsSource``); labelled records carry a mask.
      crop_size: S; every batch array is (B, S, S, ...).
      global_batch_size: labelled (= unlabelled) images per step over all processes.
      seed: fixes shuffles and augmentations.
      num_classes: labelled masks must hold values < num_classes or 255.
      shard: which part this process reads; default: by JAX process.
      workers: Grain worker processes (0: work in this process).
      read_threads: threads per process for the per-element work.
      strong_on_host: make strong views with PIL in the workers instead of on the device.
      mix_same_images: see the module docstring.
      exif_labeled / exif_unlabeled: apply EXIF orientation when decoding (plain folders).
      on_bad_input: "error" or "skip", for files that fail while training.
    """

    def __init__(self, labeled: Any, unlabeled: Any, *, crop_size: int, global_batch_size: int, seed: int,
                 num_classes: int, shard: grain.sharding.ShardOptions | None = None, workers: int = 0,
                 read_threads: int = 2, strong_on_host: bool = False, mix_same_images: bool = True,
                 exif_labeled: bool = False, exif_unlabeled: bool = False, on_bad_input: str = "error"):
        shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
        self.shard_index, self.shard_count = shard.shard_index, shard.shard_count
        n_l, n_u = len(labeled), len(unlabeled)
        if n_l == 0 or n_u == 0:
            raise ValueError(f"the training split needs labelled and unlabelled images (got {n_l} and {n_u})")
        if global_batch_size % self.shard_count:
            raise ValueError(f"config field train.batch_size={global_batch_size} must be divisible by the "
                             f"number of processes ({self.shard_count})")
        self.steps_per_epoch = n_u // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the unlabelled set has {n_u} images, fewer than one global batch "
                             f"(train.batch_size={global_batch_size})")
        self.num_labeled, self.num_unlabeled = n_l, n_u
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // self.shard_count
        self.crop_size = crop_size
        self.workers = workers
        used = self.steps_per_epoch * global_batch_size

        def stream(source: Any, stream_seed: int, repeat_to: int | None = None) -> grain.MapDataset:
            ds = grain.MapDataset.source(source)
            if repeat_to is not None and repeat_to != len(source):
                ds = grain.MapDataset.concatenate([ds] * math.ceil(repeat_to / len(source)))[:repeat_to]
            return ds.shuffle(seed=stream_seed % 2**32)[:used].repeat()

        # Distinct derived seeds per stream; the augmentation seed is separate again.
        seeds = np.random.SeedSequence(seed).generate_state(4)
        parts = [stream(labeled, int(seeds[0]), repeat_to=n_u), stream(unlabeled, int(seeds[1]))]
        if not mix_same_images:
            parts.append(stream(unlabeled, int(seeds[2])))
        zipped = grain.experimental.ZipMapDataset(parts)
        # This process's raw records, element k = (labelled, unlabelled[, mix]) (tests, inspection).
        self.records = zipped[self.shard_index::self.shard_count]
        ds = zipped.random_map(TrainTransform(crop_size, num_classes=num_classes, strong_on_host=strong_on_host,
                                          exif_labeled=exif_labeled, exif_unlabeled=exif_unlabeled,
                                          on_bad_input=on_bad_input), seed=int(seeds[3]))
        ds = ds[self.shard_index::self.shard_count]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                  prefetch_buffer_size=max(2 * self.batch_size, 4)))
        it = it.batch(self.batch_size, drop_remainder=True)
        if workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
            # Batches arrive in shared memory that Grain frees asynchronously; plain copies (a few
            # MB per batch) keep device transfers (zero-copy on CPU) and shutdown clean.
            it = it.map(_plain_arrays)
        self.dataset = it

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def describe(self) -> str:
        return (f"{self.num_labeled} labelled / {self.num_unlabeled} unlabelled images, "
                f"{self.steps_per_epoch} steps per epoch of {self.global_batch_size}+{self.global_batch_size} "
                f"(process {self.shard_index}/{self.shard_count}: batch {self.batch_size}), crop "
                f"{self.crop_size}, {self.workers} worker(s)")


def save_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Writes the iterator's position (``get_state()``) to ``path`` as JSON, atomically."""
    io.write_text_atomic(path, json.dumps(iterator.get_state()))


def restore_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Moves ``iterator`` to the position saved by ``save_state`` (same pipeline, same worker count)."""
    with open(path) as f:
        iterator.set_state(json.load(f))


class DecodeTransform:
    """record -> ``{"name": str, "image": uint8 (H, W, 3), "mask": uint8 (H, W)}`` (mask only if present)."""

    def __init__(self, exif: bool = False, num_classes: int | None = None):
        self.exif = exif
        self.num_classes = num_classes

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        image, mask = _decode_pair(rec, self.exif, self.num_classes)
        out = {"name": rec["name"], "image": image}
        if mask is not None:
            out["mask"] = mask
        return out


def eval_dataset(source: Any, *, shard: grain.sharding.ShardOptions | None = None, exif: bool = False,
                 num_classes: int | None = None) -> grain.MapDataset:
    """Decoded examples at native resolution, in source order, this process's share (p, p + P, ...).

    Each element is ``DecodeTransform``'s dict; shapes vary per image (UniMatch evaluates whole
    images, batch 1). Over all processes every example appears exactly once.
    """
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=False)
    ds = grain.MapDataset.source(source)[shard.shard_index::shard.shard_count]
    return ds.map(DecodeTransform(exif=exif, num_classes=num_classes))

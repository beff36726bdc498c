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
  ``with_mix=False`` (UniMatch V2, whose CutMix partner is the flipped batch) makes no mix view.
* Per-element work runs in ``TrainTransform``: decode, weak view (resize, crop with padding,
  flip) for every image, and, if ``strong_on_host``, the strong views with PIL; otherwise a
  uint32 ``seed`` per unlabelled view for ``device_augment.finalize``.
* Randomness: Grain's per-element generator, seeded by (seed, global element index): the same
  element gets the same augmentation whatever the worker count, process count or restart.
* Batches: global batch t is elements [t G, (t + 1) G) of the zipped stream (G =
  ``global_batch_size``); process p of P takes the contiguous rows [p G/P, (p + 1) G/P) of it,
  which is what ``jax.make_array_from_process_local_data`` expects when the mesh lists devices
  by process. So the global batch, and therefore training, is the same for any process count
  and any worker count; the processes together see every element of an epoch exactly once.
* Workers: ``mp_prefetch`` worker processes each make whole batches (batches are formed
  before the work is divided); ``read_threads`` threads per process make batches concurrently
  (PIL releases the GIL while decoding and resizing).
* Pseudo labels: an unlabelled source wrapped in ``pseudo_labels.WithPseudoLabels`` carries
  each image's label map, which gets the image's geometric augmentation (nearest) in the weak
  view and in the mix view; its padding is marked in ``ignore_mask``, apart from 255 = uncovered.
  ``pseudo_label_shift=1`` (a dataset without background, ADE20K) moves the labeller's values
  (0 = background, 1..N the classes) onto the dataset's (``readers.reduce_zero_label``: background ->
  255, k -> k - 1).
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
import threading
import time
from typing import Any

import grain
import jax
import numpy as np

from zsp_jax.data import augment, bad_input, decode
from zsp_jax.data.readers import reduce_zero_label
from zsp_jax.utils import io

log = logging.getLogger(__name__)


def _decode_pair(rec: dict[str, Any], exif: bool, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    return decode.decode_pair(rec["image"], rec["mask"], rec["name"], rec["name"] + " (mask)", exif=exif,
                              num_classes=num_classes)


def _plain_arrays(batch: Any) -> Any:
    return jax.tree.map(np.array, batch)


def _blank_unlabeled(size: int, with_label: bool) -> dict[str, np.ndarray]:
    """An unlabelled element that adds nothing to any loss: a black crop whose every pixel is padding."""
    out = {"image": np.zeros((size, size, 3), np.uint8), "ignore_mask": np.full((size, size), 255, np.uint8)}
    if with_label:
        out["pseudo_label"] = np.full((size, size), 255, np.uint8)
    return out


class TrainTransform:
    """Per-element work of the training stream (picklable, runs in Grain workers/threads).

    ``__call__((labelled record, unlabelled record[, mix record]), rng)`` returns the element dict
    documented in ``device_augment.finalize`` (without the batch axis). Unlabelled records with a
    ``pseudo_label`` entry (``pseudo_labels.WithPseudoLabels``) also give ``pseudo_label`` uint8
    (S, S) for the view and for the mix view, augmented with the image.

    A file that fails to decode (files are checked before training, so only one that changed on
    disk during the run) raises with ``on_bad_input="error"``; with ``"skip"`` that part of the
    element is replaced by a blank crop whose every target is ignore (labelled mask 255,
    unlabelled ignore mask 255), so batches keep their size and composition and the broken
    image adds nothing to the losses.
    """

    def __init__(self, crop_size: int, *, num_classes: int, strong_on_host: bool = False,
                 exif_labeled: bool = False, exif_unlabeled: bool = False, on_bad_input: str = "error",
                 with_unlabeled: bool = True, with_mix: bool = True, pseudo_label_shift: int = 0):
        self.crop_size = crop_size
        self.num_classes = num_classes
        self.strong_on_host = strong_on_host
        self.exif_labeled = exif_labeled
        self.exif_unlabeled = exif_unlabeled
        self.on_bad_input = bad_input.check_policy(on_bad_input)
        self.with_unlabeled = with_unlabeled
        self.with_mix = with_mix
        if pseudo_label_shift not in (0, 1):
            raise ValueError(f"pseudo_label_shift must be 0 or 1, got {pseudo_label_shift}")
        self.pseudo_label_shift = pseudo_label_shift

    def _strong(self, view: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.strong_on_host:
            view["image_s1"], view["cutmix_box1"] = augment.strong_view(view["image"], rng)
            view["image_s2"], view["cutmix_box2"] = augment.strong_view(view["image"], rng)
        else:
            view["seed"] = np.uint32(rng.integers(0, 2**32, dtype=np.uint64))
        return view

    def _unlabeled_view(self, decoded: tuple[np.ndarray, np.ndarray | None] | None, with_label: bool,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
        if decoded is None:
            view = _blank_unlabeled(self.crop_size, with_label)
        else:
            img, ignore, label = augment.unlabeled_weak_view(decoded[0], decoded[1], self.crop_size, rng)
            view = {"image": img, "ignore_mask": ignore}
            if label is not None:
                view["pseudo_label"] = label
        return self._strong(view, rng)

    def _decode(self, rec: dict[str, Any], labeled: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(image, mask or pseudo label) of a record; None for a bad file under ``on_bad_input="skip"``."""
        try:
            if labeled:
                img, mask = _decode_pair(rec, self.exif_labeled, self.num_classes)
                if mask is None:
                    raise bad_input.BadInputError(rec["name"], "labelled example has no mask")
                return img, mask
            label_bytes = rec.get("pseudo_label")
            img, label = decode.decode_pair(rec["image"], label_bytes, rec["name"],
                                            rec.get("pseudo_label_path", rec["name"] + " (pseudo label)"),
                                            exif=self.exif_unlabeled, num_classes=self.num_classes
                                            + self.pseudo_label_shift)
            if label_bytes is not None and label is None:
                raise bad_input.BadInputError(rec.get("pseudo_label_path", rec["name"]), "empty pseudo-label file")
            if label is not None and self.pseudo_label_shift:
                label = reduce_zero_label(label)
            return img, label
        except bad_input.BadInputError as e:
            if self.on_bad_input == "error":
                raise
            log.warning("blanking a bad input during training (it adds nothing to the losses): %s", e)
            return None

    def __call__(self, element: tuple[dict[str, Any], ...], rng: np.random.Generator) -> dict[str, Any]:
        lab = self._decode(element[0], labeled=True)
        if lab is None:
            img = np.zeros((self.crop_size, self.crop_size, 3), np.uint8)
            mask = np.full((self.crop_size, self.crop_size), 255, np.uint8)
        else:
            img, mask = augment.weak_view(lab[0], lab[1], self.crop_size, rng)
        out: dict[str, Any] = {"labeled": {"image": img, "mask": mask}}
        if not self.with_unlabeled:
            return out
        with_label = "pseudo_label" in element[1]
        unl = self._decode(element[1], labeled=False)
        out["unlabeled"] = self._unlabeled_view(unl, with_label, rng)
        if self.with_mix:
            mix = self._decode(element[2], labeled=False) if len(element) > 2 else unl
            out["unlabeled_mix"] = self._unlabeled_view(mix, with_label, rng)
        return out


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker set-up: the worker exits when the process that started it is gone.

    A training process killed with SIGKILL cannot stop its workers, which would otherwise stay
    blocked on their output queues holding memory (and the job's stdout) forever.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class TrainPipeline:
    """The UniMatch training input of one process (see the module docstring).

    Args:
      labeled / unlabeled: Grain random-access sources of records (``sources.FileSource`` or
        ``sources.TfdsSource``); labelled records carry a mask; unlabelled records may carry a
        pseudo label (``pseudo_labels.WithPseudoLabels``).
      crop_size: S; every batch array is (B, S, S, ...).
      global_batch_size: labelled (= unlabelled) images per step over all processes.
      seed: fixes shuffles and augmentations.
      num_classes: labelled masks and pseudo labels must hold values < num_classes or 255.
      shard: which part this process reads; default: by JAX process.
      workers: Grain worker processes (0: work in this process).
      read_threads: threads per process making batches.
      strong_on_host: make strong views with PIL in the workers instead of on the device.
      mix_same_images: see the module docstring.
      exif_labeled / exif_unlabeled: apply EXIF orientation when decoding (plain folders).
      on_bad_input: "error" or "skip", for files that fail while training.
      with_unlabeled: False: labelled images only (supervised training; the epoch length is still
        ``n_u // global_batch``, so every mode counts steps alike).
      with_mix: False: no ``unlabeled_mix`` view (UniMatch V2: the CutMix partner is the flipped batch).
      pseudo_label_shift: 1 for a dataset without background (see the module docstring), else 0.
    """

    def __init__(self, labeled: Any, unlabeled: Any, *, crop_size: int, global_batch_size: int, seed: int,
                 num_classes: int, shard: grain.sharding.ShardOptions | None = None, workers: int = 0,
                 read_threads: int = 2, strong_on_host: bool = False, mix_same_images: bool = True,
                 exif_labeled: bool = False, exif_unlabeled: bool = False, on_bad_input: str = "error",
                 with_unlabeled: bool = True, with_mix: bool = True, pseudo_label_shift: int = 0):
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
        parts = [stream(labeled, int(seeds[0]), repeat_to=n_u)]
        if with_unlabeled:
            parts.append(stream(unlabeled, int(seeds[1])))
            if with_mix and not mix_same_images:
                parts.append(stream(unlabeled, int(seeds[2])))
        # Global element k = (labelled k, unlabelled k[, mix k]); global batch t = elements [t G, (t + 1) G).
        self.records = grain.experimental.ZipMapDataset(parts)
        ds = self.records.random_map(
            TrainTransform(crop_size, num_classes=num_classes, strong_on_host=strong_on_host,
                           exif_labeled=exif_labeled, exif_unlabeled=exif_unlabeled, on_bad_input=on_bad_input,
                           with_unlabeled=with_unlabeled, with_mix=with_mix, pseudo_label_shift=pseudo_label_shift),
            seed=int(seeds[3]))
        # Batches are made before the per-process slice and before the workers: process p takes
        # batch t's contiguous rows [p b, (p + 1) b), and each worker makes whole batches, so a
        # global batch is the same whatever the process or worker count (a worker count that
        # divided elements among workers would interleave them differently per count).
        ds = ds.batch(self.batch_size, drop_remainder=True)[self.shard_index::self.shard_count]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 2)))
        if workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                worker_init_fn=exit_with_parent)
            # Batches arrive in shared memory that Grain frees asynchronously; plain copies (a few
            # MB per batch) keep device transfers (zero-copy on CPU) and shutdown clean.
            it = it.map(_plain_arrays)
        self.dataset = it

    def element_index(self, local_step: int, row: int) -> int:
        """The global element index of row ``row`` of this process's batch number ``local_step``."""
        return (local_step * self.shard_count + self.shard_index) * self.batch_size + row

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

"""Sharded, static-shape evaluation: mIoU of a DeepLabV3+ on the validation list, UniMatch's modes.

Modes (UniMatch ``supervised.py: evaluate``, re-stated; ``zsp_jax.references.unimatch_step.evaluate``
is the literal re-statement the tests compare with):

* ``original``: the whole image at its own resolution (UniMatch's PASCAL / COCO setting).
* ``center_crop``: the ``crop x crop`` centre, sliced exactly as the reference
  (``start = (h - crop) // 2`` with Python's slicing, so an image smaller than the crop gives
  the reference's odd slice).
* ``sliding_window``: windows of ``crop x crop`` at every multiple of ``stride = int(crop * 2 / 3)``
  below the image size, clipped to the image as the reference's, the softmax summed over
  windows, the argmax of the sum.

Static shapes: each image is padded right/bottom (image 0 after normalisation, target 255) to
a canvas: its size rounded up to a multiple of ``eval.bucket``. Images that share a canvas are
evaluated together in global batches of ``eval.batch_size`` (padded with empty entries), split
over every device, so the number of compiled programs is the number of distinct canvases, not
of image sizes. Padding never counts: its target is 255. Zero padding does change what the
network sees near the right and bottom edges (and the ASPP image pooling), so a bucket > 0 is
close to, not identical with, the reference; in ``center_crop`` the crop is padded to
``crop x crop``, in ``sliding_window`` a window that overhangs the image runs at the full
window size on the padded canvas (the reference runs the clipped, smaller window). The README
gives the measured difference.

``eval.bucket = 0`` reproduces the reference exactly in every mode (the tests check it against
the literal re-statement): every image (``center_crop``: its slice) runs at its exact size and
every sliding window at its clipped size, at the price of one compilation per distinct image
size.

Metrics: a (C, C + 1) confusion matrix per batch on the device (``zsp_jax.metrics``, summed
over the global batch by XLA), summed on the host in int64, then ``metrics.summarize``: mIoU
(UniMatch's), per-class IoU, pixel accuracy. Every process computes the same batch plan from
the image sizes and loads its contiguous rows of each global batch; every process gets the
same totals.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zsp_jax import metrics
from zsp_jax.data import augment, decode
from zsp_jax.train.state import Placement
from zsp_jax.train.step import make_forward

log = logging.getLogger(__name__)

MODES = ("original", "center_crop", "sliding_window")
IGNORE = metrics.IGNORE_LABEL


def round_up(n: int, multiple: int) -> int:
    return n if multiple <= 0 else -(-n // multiple) * multiple


def window_stride(crop: int) -> int:
    """UniMatch's sliding-window stride: ``int(crop * 2 / 3)``."""
    return int(crop * 2 / 3)


def window_starts(size: int, crop: int) -> list[int]:
    """Window origins along one axis: every multiple of the stride below ``size`` (the reference's
    ``while row < h: ...; row += stride``)."""
    return list(range(0, size, window_stride(crop)))


def center_crop_box(h: int, w: int, crop: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the reference's centre crop of an (h, w) image: ``img[sh:sh + crop, sw:sw + crop]``
    with ``sh = (h - crop) // 2`` under Python's slicing rules (a negative start counts from the end)."""
    y0, y1, _ = slice((h - crop) // 2, (h - crop) // 2 + crop).indices(h)
    x0, x1, _ = slice((w - crop) // 2, (w - crop) // 2 + crop).indices(w)
    return y0, max(y0, y1), x0, max(x0, x1)


def canvas_shape(h: int, w: int, *, mode: str, crop: int, bucket: int) -> tuple[int, int]:
    """The padded (H, W) an image of size (h, w) is evaluated at (``bucket`` 0: exact sizes)."""
    if mode == "center_crop":
        y0, y1, x0, x1 = center_crop_box(h, w, crop)
        return (crop, crop) if bucket > 0 else (y1 - y0, x1 - x0)
    if mode == "sliding_window" and bucket > 0:  # every window at full size on the padded canvas
        need_h, need_w = window_starts(h, crop)[-1] + crop, window_starts(w, crop)[-1] + crop
        return round_up(need_h, bucket), round_up(need_w, bucket)
    return round_up(h, bucket), round_up(w, bucket)


def center_crop(image: np.ndarray, mask: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's centre crop of an image (H, W, 3) and its mask (H, W)."""
    y0, y1, x0, x1 = center_crop_box(*mask.shape, crop)
    return image[y0:y1, x0:x1], mask[y0:y1, x0:x1]


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One global evaluation batch: its canvas (H, W) and the source indices of its rows (-1: empty row)."""

    canvas: tuple[int, int]
    indices: tuple[int, ...]


def plan_batches(sizes: Sequence[tuple[int, int]], *, mode: str, crop: int, bucket: int,
                 global_batch: int) -> list[EvalBatch]:
    """Groups images by canvas (first appearance order, source order inside a group) into global batches."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(canvas_shape(h, w, mode=mode, crop=crop, bucket=bucket), []).append(i)
    out = []
    for canvas, idx in groups.items():
        for start in range(0, len(idx), global_batch):
            chunk = idx[start:start + global_batch]
            out.append(EvalBatch(canvas, tuple(chunk + [-1] * (global_batch - len(chunk)))))
    return out


def prepare_example(record: dict[str, Any] | None, canvas: tuple[int, int], *, mode: str, crop: int,
                    num_classes: int, exif: bool = False, need_mask: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 (H, W, 3) normalised, target int32 (H, W) with 255 on padding, (h, w) int32) on
    ``canvas``; ``record`` None gives an empty row (all padding, size 0). Without ``need_mask`` an
    unlabelled record gives an all-255 target (prediction only)."""
    ch, cw = canvas
    image = np.zeros((ch, cw, 3), np.float32)
    target = np.full((ch, cw), IGNORE, np.int32)
    if record is None:
        return image, target, np.zeros(2, np.int32)
    img, mask = decode.decode_pair(record["image"], record.get("mask") if need_mask else None, record["name"],
                                   record["name"] + " (mask)", num_classes=num_classes, exif=exif)
    if mask is None:
        if need_mask:
            raise ValueError(f"evaluation image {record['name']} has no mask")
        mask = np.full(img.shape[:2], IGNORE, np.uint8)
    if mode == "center_crop":
        img, mask = center_crop(img, mask, crop)
    h, w = mask.shape
    image[:h, :w] = augment.normalize(img)
    target[:h, :w] = mask
    return image, target, np.array([h, w], np.int32)


EvalFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_predict_fn(graphdef: nnx.GraphDef, *, mode: str, crop: int, exact_windows: bool = False
                    ) -> Callable[..., jax.Array]:
    """``predict(params, stats, images (B, H, W, 3), sizes (B, 2)) -> (B, H, W) int32`` argmax classes.

    ``sliding_window``: ``exact_windows`` (``eval.bucket = 0``, the canvas is the image) runs each window
    clipped to the canvas, as the reference; otherwise every window runs at ``crop x crop`` on the padded
    canvas and only the windows that start inside an image's own size count for it. Windows of the same
    shape go through the model as one batch.
    """
    forward = make_forward(graphdef)

    def predict(params: Any, stats: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        if mode != "sliding_window":
            logits, _ = forward(params, stats, images, train=False)
            return jnp.argmax(logits, axis=-1)
        b, hc, wc, _ = images.shape
        stride = window_stride(crop)
        if exact_windows:
            boxes = [(r, min(r + crop, hc), c, min(c + crop, wc)) for r in range(0, hc, stride)
                     for c in range(0, wc, stride)]
        else:
            boxes = [(r, r + crop, c, c + crop) for r in range(0, hc - crop + 1, stride)
                     for c in range(0, wc - crop + 1, stride)]
        by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        for box in boxes:
            by_shape.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
        total = None
        for group in by_shape.values():
            windows = jnp.concatenate([images[:, r0:r1, c0:c1] for r0, r1, c0, c1 in group])
            logits, _ = forward(params, stats, windows, train=False)
            probs = jax.nn.softmax(logits, axis=-1).reshape((len(group), b) + logits.shape[1:])
            if total is None:
                total = jnp.zeros((b, hc, wc, probs.shape[-1]), probs.dtype)
            for k, (r0, r1, c0, c1) in enumerate(group):
                inside = ((r0 < sizes[:, 0]) & (c0 < sizes[:, 1])).astype(probs.dtype)  # windows the reference runs
                total = total.at[:, r0:r1, c0:c1].add(probs[k] * inside[:, None, None, None])
        return jnp.argmax(total, axis=-1)

    return predict


def make_eval_fn(graphdef: nnx.GraphDef, *, mode: str, crop: int, num_classes: int,
                 exact_windows: bool = False) -> EvalFn:
    """``fn(params, stats, images (B, H, W, 3), targets (B, H, W), sizes (B, 2)) -> (C, C + 1) int32``
    (to be jitted; one compilation per canvas shape)."""
    predict = make_predict_fn(graphdef, mode=mode, crop=crop, exact_windows=exact_windows)

    def fn(params: Any, stats: Any, images: jax.Array, targets: jax.Array, sizes: jax.Array) -> jax.Array:
        return metrics.confusion_matrix_device(predict(params, stats, images, sizes), targets, num_classes)

    return fn


@dataclasses.dataclass
class _Batched:
    """The batch plan over a source, and the loading of each process's rows (a thread pool decodes the
    next batches while the device works)."""

    graphdef: nnx.GraphDef
    source: Any
    sizes: list[tuple[int, int]]
    placement: Placement
    mode: str = "original"
    crop: int = 321
    bucket: int = 64
    batch_size: int = 0
    num_classes: int = 21
    class_names: Sequence[str] | None = None
    threads: int = 4
    exif: bool = False

    _need_mask = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"config field eval.mode={self.mode!r}: expected one of {list(MODES)}")
        n_dev = self.placement.mesh.size
        self.batch_size = self.batch_size or n_dev
        if self.batch_size % n_dev or self.batch_size % jax.process_count():
            raise ValueError(f"config field eval.batch_size={self.batch_size}: must be a multiple of the number of "
                             f"devices ({n_dev}) and of processes ({jax.process_count()})")
        self.plan = plan_batches(self.sizes, mode=self.mode, crop=self.crop, bucket=self.bucket,
                                 global_batch=self.batch_size)

    @property
    def canvases(self) -> list[tuple[int, int]]:
        """The distinct canvas shapes (one compiled program each)."""
        return sorted({b.canvas for b in self.plan})

    def _local_rows(self, batch: EvalBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        per_process = self.batch_size // jax.process_count()
        start = jax.process_index() * per_process
        rows = [prepare_example(self.source[i] if i >= 0 else None, batch.canvas, mode=self.mode, crop=self.crop,
                                num_classes=self.num_classes, exif=self.exif, need_mask=self._need_mask)
                for i in batch.indices[start:start + per_process]]
        return tuple(np.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]

    def _global_batches(self, desc: str, progress: bool) -> Iterator[tuple[EvalBatch, list[jax.Array]]]:
        """(plan entry, [images, targets, sizes] as global arrays) in plan order."""
        sharding = self.placement.batch
        bar = tqdm.tqdm(total=len(self.plan), desc=desc, unit="batch", leave=False,
                        disable=not progress or jax.process_index() != 0)
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            pending = [pool.submit(self._local_rows, b) for b in self.plan[:2]]
            for k, batch in enumerate(self.plan):
                if k + 2 < len(self.plan):
                    pending.append(pool.submit(self._local_rows, self.plan[k + 2]))
                local = pending.pop(0).result()
                yield batch, [jax.make_array_from_process_local_data(sharding, a) for a in local]
                bar.update(1)
        bar.close()


@dataclasses.dataclass
class Evaluator(_Batched):
    """Evaluates parameters on a fixed list of labelled images (see the module docstring).

    Build it once per run (the batch plan and the compiled programs are reused every epoch).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        # Replicated output: every process reads the whole matrix from its first device.
        self.fn = jax.jit(make_eval_fn(self.graphdef, mode=self.mode, crop=self.crop, num_classes=self.num_classes,
                                       exact_windows=self.bucket == 0),
                          out_shardings=NamedSharding(self.placement.mesh, P()))

    def confusion(self, params: Any, batch_stats: Any, *, progress: bool = True) -> np.ndarray:
        """The (C, C + 1) int64 confusion matrix of ``params`` over every image."""
        total = None
        for _, args in self._global_batches("evaluating", progress):
            total = metrics.accumulate(total, self.fn(params, batch_stats, *args).addressable_data(0))
        return total

    def evaluate(self, params: Any, batch_stats: Any, *, progress: bool = True) -> dict[str, Any]:
        """``metrics.summarize`` of the confusion matrix, plus ``images``, ``seconds`` and ``mode``."""
        t0 = time.perf_counter()
        cm = self.confusion(params, batch_stats, progress=progress)
        out = metrics.summarize(cm, self.class_names)
        out.update(images=len(self.sizes), seconds=round(time.perf_counter() - t0, 2), mode=self.mode,
                   bucket=self.bucket, canvases=len(self.canvases))
        return out


@dataclasses.dataclass
class Predictor(_Batched):
    """Whole-image predictions (argmax class maps) of a list of images, labelled or not, batched as
    ``Evaluator`` (mode ``original`` or ``sliding_window``)."""

    _need_mask = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "center_crop":
            raise ValueError("predictions cover whole images: mode 'original' or 'sliding_window'")
        predict = make_predict_fn(self.graphdef, mode=self.mode, crop=self.crop, exact_windows=self.bucket == 0)
        self.fn = jax.jit(lambda p, s, images, targets, sizes: predict(p, s, images, sizes).astype(jnp.uint8),
                          out_shardings=NamedSharding(self.placement.mesh, P()))

    def predictions(self, params: Any, batch_stats: Any, *, progress: bool = True
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """(source index, uint8 (h, w) class map) for every image, in plan order, in every process."""
        for batch, args in self._global_batches("predicting", progress):
            maps = np.asarray(self.fn(params, batch_stats, *args).addressable_data(0))
            for row, i in enumerate(batch.indices):
                if i >= 0:
                    h, w = self.sizes[i]
                    yield i, maps[row, :h, :w]

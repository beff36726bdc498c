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

UniMatch V2 (``model.family=unimatch_v2``; ``supervised.py: evaluate(..., multiplier=14)`` at f6afb4df,
re-stated; V2 has no centre-crop mode):

* ``original``: each image, ImageNet-normalised, is resized (bilinear, ``align_corners=True``) to
  ``(int(h / 14 + 0.5) * 14, int(w / 14 + 0.5) * 14)`` (the nearest multiples of DINOv2's patch), the
  model's logits are resized back to ``(h, w)`` the same way, and the argmax of those is the prediction.
  Both resizes are separable matrices (``zsp_jax.utils.resize.align_corners_matrix``) built on the host
  per image and padded with zeros to the image's canvas, so the model sees exactly V2's resized image:
  images are grouped by (canvas, resized size), and each group's model input has no padding at all
  (a ViT's attention and its positional-embedding grid would otherwise see the padding, which is worse
  than a convolution's edge effect). The number of compiled programs is the number of distinct resized
  sizes (times canvases), not of image sizes; ``eval.bucket`` only decides the canvases, and changes no
  prediction.
* ``sliding_window``: windows of ``crop x crop`` (a multiple of 14) at rows ``0, s, 2s, ...`` clipped so
  that the last one ends at the image's edge (V2's ``min(row + int(crop * 2 / 3), h - crop)``; V1's
  windows overhang the edge instead), the softmax summed over windows, the argmax of the sum. The
  window origins are per image (dynamic slices), so images of different sizes share a canvas and every
  window lies inside its image, as in V2. Differences: an image smaller than the crop along an axis
  (where V2's loop does not terminate sensibly) gets one window at 0 over the zero-padded canvas; V2
  accumulates into a 19-class buffer (Cityscapes'), ours has ``num_classes``.

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
from zsp_jax.train.state import V2_PATCH, Placement
from zsp_jax.train.step import make_forward
from zsp_jax.utils.resize import align_corners_matrix

log = logging.getLogger(__name__)

MODES = ("original", "center_crop", "sliding_window")
MODES_V2 = ("original", "sliding_window")  # UniMatch V2's evaluate has no centre crop
IGNORE = metrics.IGNORE_LABEL
HIGHEST = jax.lax.Precision.HIGHEST


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


def v2_input_size(h: int, w: int, multiple: int = V2_PATCH) -> tuple[int, int]:
    """The size V2's ``original`` mode resizes an (h, w) image to: ``int(x / 14 + 0.5) * 14`` per side (at least
    one patch; V2 would fail on a side under 7 pixels)."""
    return tuple(max(int(x / multiple + 0.5), 1) * multiple for x in (h, w))  # type: ignore[return-value]


def v2_window_starts(size: int, crop: int) -> list[int]:
    """V2's window origins along one axis: ``0, s, 2s, ...`` (s = ``int(crop * 2 / 3)``) clipped to
    ``size - crop``, which ends the list; a single window at 0 when ``size <= crop``."""
    starts, pos = [0], 0
    while pos < size - crop:
        pos = min(pos + window_stride(crop), size - crop)
        starts.append(pos)
    return starts


def canvas_shape(h: int, w: int, *, mode: str, crop: int, bucket: int, family: str = "deeplab") -> tuple[int, int]:
    """The padded (H, W) an image of size (h, w) is evaluated at (``bucket`` 0: exact sizes)."""
    if family == "unimatch_v2" and mode == "sliding_window":  # V2's windows lie inside the image (or pad to one)
        return round_up(max(h, crop), bucket), round_up(max(w, crop), bucket)
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
    """One global evaluation batch: its canvas (H, W), the source indices of its rows (-1: empty row) and, for
    V2's ``original`` mode, the size (H', W') its images are resized to for the model."""

    canvas: tuple[int, int]
    indices: tuple[int, ...]
    model_shape: tuple[int, int] | None = None


def plan_batches(sizes: Sequence[tuple[int, int]], *, mode: str, crop: int, bucket: int,
                 global_batch: int, family: str = "deeplab") -> list[EvalBatch]:
    """Groups images by canvas (and V2's resized size) (first appearance order, source order inside a group)
    into global batches."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        canvas = canvas_shape(h, w, mode=mode, crop=crop, bucket=bucket, family=family)
        model_shape = v2_input_size(h, w) if family == "unimatch_v2" and mode == "original" else None
        groups.setdefault((canvas, model_shape), []).append(i)
    out = []
    for (canvas, model_shape), idx in groups.items():
        for start in range(0, len(idx), global_batch):
            chunk = idx[start:start + global_batch]
            out.append(EvalBatch(canvas, tuple(chunk + [-1] * (global_batch - len(chunk))), model_shape))
    return out


def v2_resize_matrices(size: tuple[int, int], canvas: tuple[int, int], model_shape: tuple[int, int]
                       ) -> tuple[np.ndarray, ...]:
    """The four float32 matrices of V2's ``original`` mode for an image of ``size`` (h, w) on ``canvas``:
    ``rows_in`` (H', Hc), ``cols_in`` (W', Wc) (canvas -> model input, zero on the padding), ``rows_out``
    (Hc, H'), ``cols_out`` (Wc, W') (logits -> the image's size, zero rows on the padding); all zero for an
    empty row (size (0, 0)). Each is ``F.interpolate(..., align_corners=True)`` along one axis."""
    (h, w), (hc, wc), (mh, mw) = size, canvas, model_shape
    rows_in, cols_in = np.zeros((mh, hc), np.float32), np.zeros((mw, wc), np.float32)
    rows_out, cols_out = np.zeros((hc, mh), np.float32), np.zeros((wc, mw), np.float32)
    if h and w:
        rows_in[:, :h], cols_in[:, :w] = align_corners_matrix(mh, h), align_corners_matrix(mw, w)
        rows_out[:h], cols_out[:w] = align_corners_matrix(h, mh), align_corners_matrix(w, mw)
    return rows_in, cols_in, rows_out, cols_out


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


EvalFn = Callable[..., jax.Array]


def make_predict_fn(graphdef: nnx.GraphDef, *, mode: str, crop: int, exact_windows: bool = False,
                    family: str = "deeplab") -> Callable[..., jax.Array]:
    """``predict(params, stats, images (B, H, W, 3), sizes (B, 2), *extra) -> (B, H, W) int32`` argmax classes
    (``unimatch_v2``: ``make_predict_fn_v2``).

    ``sliding_window``: ``exact_windows`` (``eval.bucket = 0``, the canvas is the image) runs each window
    clipped to the canvas, as the reference; otherwise every window runs at ``crop x crop`` on the padded
    canvas and only the windows that start inside an image's own size count for it. Windows of the same
    shape go through the model as one batch.
    """
    if family == "unimatch_v2":
        return make_predict_fn_v2(graphdef, mode=mode, crop=crop)
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


def make_predict_fn_v2(graphdef: nnx.GraphDef, *, mode: str, crop: int) -> Callable[..., jax.Array]:
    """UniMatch V2's evaluation (see the module docstring):
    ``predict(params, stats, images (B, Hc, Wc, 3), sizes (B, 2), *matrices) -> (B, Hc, Wc) int32``.

    ``original`` takes ``v2_resize_matrices``' four matrices batched ((B, H', Hc), (B, W', Wc), (B, Hc, H'),
    (B, Wc, W')); ``sliding_window`` none (``stats`` is unused: the segmenter has no BatchNorm).
    """
    from zsp_jax.train.v2_step import make_forward as make_forward_v2

    forward = make_forward_v2(graphdef)
    if mode not in MODES_V2:
        raise ValueError(f"config field eval.mode={mode!r}: model.family=unimatch_v2 evaluates in {list(MODES_V2)}")

    def original(params: Any, stats: Any, images: jax.Array, sizes: jax.Array, rows_in: jax.Array,
                 cols_in: jax.Array, rows_out: jax.Array, cols_out: jax.Array) -> jax.Array:
        x = jnp.einsum("bph,bhwc->bpwc", rows_in, images, precision=HIGHEST)
        x = jnp.einsum("bqw,bpwc->bpqc", cols_in, x, precision=HIGHEST)
        logits = forward(params, x)
        y = jnp.einsum("bhp,bpqc->bhqc", rows_out, logits, precision=HIGHEST)
        y = jnp.einsum("bwq,bhqc->bhwc", cols_out, y, precision=HIGHEST)
        return jnp.argmax(y, axis=-1)

    def sliding(params: Any, stats: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        b, hc, wc, _ = images.shape
        stride = window_stride(crop)

        def origins(extent: int, size: jax.Array) -> tuple[jax.Array, jax.Array]:
            # (B, n) origins min(k s, size - crop) and whether V2's loop reaches window k
            k = jnp.arange(len(v2_window_starts(extent, crop)))
            last = jnp.maximum(size - crop, 0)[:, None]
            return jnp.minimum(k * stride, last), (k == 0) | ((k - 1) * stride < last)

        rows, rows_ok = origins(hc, sizes[:, 0])
        cols, cols_ok = origins(wc, sizes[:, 1])
        n_r, n_c = rows.shape[1], cols.shape[1]

        def window(image: jax.Array, r: jax.Array, c: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(image, (r, c, 0), (crop, crop, image.shape[-1]))

        grid = jax.vmap(lambda image, rs, cs: jax.vmap(lambda r: jax.vmap(lambda c: window(image, r, c))(cs))(rs))
        windows = grid(images, rows, cols)  # (B, n_r, n_c, crop, crop, 3)
        logits = forward(params, windows.reshape((-1, crop, crop, images.shape[-1])))
        probs = jax.nn.softmax(logits, axis=-1).reshape((b, n_r, n_c, crop, crop, logits.shape[-1]))

        def add(total: jax.Array, p: jax.Array, r: jax.Array, c: jax.Array, ok: jax.Array) -> jax.Array:
            here = jax.lax.dynamic_slice(total, (r, c, 0), p.shape)
            return jax.lax.dynamic_update_slice(total, here + p * ok.astype(p.dtype), (r, c, 0))

        total = jnp.zeros((b, hc, wc, logits.shape[-1]), probs.dtype)
        for i in range(n_r):  # windows that V2 does not run (past the last origin) add nothing
            for j in range(n_c):
                total = jax.vmap(add)(total, probs[:, i, j], rows[:, i], cols[:, j], rows_ok[:, i] & cols_ok[:, j])
        return jnp.argmax(total, axis=-1)

    return original if mode == "original" else sliding


def make_eval_fn(graphdef: nnx.GraphDef, *, mode: str, crop: int, num_classes: int,
                 exact_windows: bool = False, family: str = "deeplab") -> EvalFn:
    """``fn(params, stats, images (B, H, W, 3), targets (B, H, W), sizes (B, 2), *extra) -> (C, C + 1) int32``
    (to be jitted; one compilation per canvas shape; ``extra``: V2's resize matrices in ``original`` mode)."""
    predict = make_predict_fn(graphdef, mode=mode, crop=crop, exact_windows=exact_windows, family=family)

    def fn(params: Any, stats: Any, images: jax.Array, targets: jax.Array, sizes: jax.Array, *extra: jax.Array
           ) -> jax.Array:
        return metrics.confusion_matrix_device(predict(params, stats, images, sizes, *extra), targets, num_classes)

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
    family: str = "deeplab"

    _need_mask = True

    def __post_init__(self) -> None:
        modes = MODES_V2 if self.family == "unimatch_v2" else MODES
        if self.mode not in modes:
            raise ValueError(f"config field eval.mode={self.mode!r}: expected one of {list(modes)}")
        n_dev = self.placement.mesh.size
        self.batch_size = self.batch_size or n_dev
        if self.batch_size % n_dev or self.batch_size % jax.process_count():
            raise ValueError(f"config field eval.batch_size={self.batch_size}: must be a multiple of the number of "
                             f"devices ({n_dev}) and of processes ({jax.process_count()})")
        self.plan = plan_batches(self.sizes, mode=self.mode, crop=self.crop, bucket=self.bucket,
                                 global_batch=self.batch_size, family=self.family)

    @property
    def canvases(self) -> list[tuple[int, int]]:
        """The distinct canvas shapes."""
        return sorted({b.canvas for b in self.plan})

    @property
    def programs(self) -> int:
        """The number of compiled programs: distinct canvases (V2's ``original``: distinct (canvas, resized size))."""
        return len({(b.canvas, b.model_shape) for b in self.plan})

    def _local_rows(self, batch: EvalBatch) -> tuple[np.ndarray, ...]:
        per_process = self.batch_size // jax.process_count()
        start = jax.process_index() * per_process
        rows = [prepare_example(self.source[i] if i >= 0 else None, batch.canvas, mode=self.mode, crop=self.crop,
                                num_classes=self.num_classes, exif=self.exif, need_mask=self._need_mask)
                for i in batch.indices[start:start + per_process]]
        if batch.model_shape is not None:  # V2's original mode: each row's resize matrices
            rows = [row + v2_resize_matrices(tuple(int(v) for v in row[2]), batch.canvas, batch.model_shape)
                    for row in rows]
        return tuple(np.stack(parts) for parts in zip(*rows))

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
                                       exact_windows=self.bucket == 0, family=self.family),
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
                   bucket=self.bucket, canvases=len(self.canvases), programs=self.programs)
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
        if self.family != "deeplab":
            raise ValueError("predictions (relabelling) are made with the deeplab family's model only")
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

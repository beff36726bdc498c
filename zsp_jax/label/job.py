"""A labelling job over a list of image files: resumable, streamed, host and device overlapped.

``run_job(labeller, items, out_dir)``:

1. resume: images with a manifest line are finished (done or reported as bad) and skipped;
   ``.tmp-*`` files a kill left are removed;
2. sizes: a thread pool reads every remaining image's header (size, EXIF orientation) — no
   pixels are kept, so a folder of 100,000 images costs a list of names and sizes; unreadable
   files are reported at once;
3. work split: images are grouped by size bucket; across processes whole buckets are dealt to
   the least-loaded process (a bucket larger than a fair share is cut at group boundaries), so
   each process compiles only its buckets; within a bucket images go in name order, in groups
   of ``images_per_device``, so every image is computed in the same group whatever the number
   of devices or processes (the same bits);
4. the loop: decode + preparation run ``prefetch`` batches ahead in ``decode_threads`` threads;
   the device works on one batch while the host converts the previous one; ``write_threads``
   write the files, and each image's manifest line is appended after its files are in place;
5. a summary with counts, failures, per-stage times and the fraction of time the device waited.

Bad input (0-byte, truncated, unreadable, too large for PIL) never stops the run: it is
reported in the manifest (``status: "failed"``) and the summary. Grey, 16-bit, CMYK and RGBA
images are converted (``zsp_jax.data.decode``).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from zsp_jax.amg.geometry import Bucket
from zsp_jax.label import outputs as O


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One image to label: ``name`` (unique, relative; decides the output paths), its file, whether
    to apply the EXIF orientation, and its ground-truth mask if one exists."""

    name: str
    path: str
    exif: bool = False
    gt: str | None = None


def read_size(item: WorkItem) -> tuple[int, int]:
    """(H, W) of an image file as it will be decoded (EXIF rotations applied), from its header."""
    import warnings

    from PIL import Image

    if os.path.getsize(item.path) == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(item.path) as img:
            w, h = img.size
            if item.exif and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    if w < 1 or h < 1:
        raise ValueError(f"image has zero size {w}x{h}")
    return h, w


def scan_sizes(items: Sequence[WorkItem], threads: int, progress: bool = True
               ) -> tuple[list[tuple[WorkItem, tuple[int, int]]], list[tuple[WorkItem, str]]]:
    """Headers of ``items`` in parallel: (sized items in input order, (item, reason) of unreadable ones)."""
    import tqdm

    def one(item: WorkItem) -> tuple[WorkItem, Any]:
        try:
            return item, read_size(item)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never raised
            return item, f"cannot read: {type(e).__name__}: {e}"

    sized, failed = [], []
    with cf.ThreadPoolExecutor(threads) as pool, \
            tqdm.tqdm(total=len(items), desc="reading sizes", unit="img", leave=False, disable=not progress) as bar:
        for item, res in pool.map(one, items, chunksize=64):
            (failed if isinstance(res, str) else sized).append((item, res))
            bar.update(1)
    return sized, failed


def split_work(groups: dict[Bucket, list[Any]], group_size: int, process_index: int, process_count: int
               ) -> list[tuple[Bucket, list[Any]]]:
    """This process's share: whole buckets to the least-loaded process, big buckets cut at group boundaries.

    Deterministic: every process computes the same assignment from the same ``groups``.
    """
    total = sum(len(v) for v in groups.values())
    fair = -(-total // max(process_count, 1))
    fair = -(-fair // group_size) * group_size  # pieces end at group boundaries
    pieces = []
    for bucket in sorted(groups, key=lambda b: (b.height, b.width, b.min_long_side)):
        items = groups[bucket]
        for start in range(0, len(items), fair):
            pieces.append((bucket, items[start:start + fair]))
    pieces.sort(key=lambda p: -len(p[1]))  # largest first (LPT), stable for equal sizes
    load = [0] * process_count
    mine = []
    for bucket, items in pieces:
        target = min(range(process_count), key=lambda p: (load[p], p))
        load[target] += len(items)
        if target == process_index:
            mine.append((bucket, items))
    mine.sort(key=lambda p: (p[0].height, p[0].width, p[0].min_long_side))
    return mine


class _DeviceClock:
    """Records when each dispatched batch finishes, to tell how long the device sat idle."""

    def __init__(self) -> None:
        self._pool = cf.ThreadPoolExecutor(1)
        self.intervals: list[tuple[float, cf.Future]] = []

    def started(self, outputs: Any) -> None:
        t0 = time.perf_counter()
        self.intervals.append((t0, self._pool.submit(lambda: (jax.block_until_ready(outputs),
                                                              time.perf_counter())[1])))

    def busy(self) -> tuple[float, float]:
        """(seconds some batch was on the device, seconds from the first dispatch to the last finish)."""
        busy, last_end = 0.0, 0.0
        for t0, fut in self.intervals:
            end = fut.result()
            start = max(t0, last_end)
            busy += max(0.0, end - start)
            last_end = max(last_end, end)
        window = last_end - self.intervals[0][0] if self.intervals else 0.0
        return busy, window

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass
class StageTimes:
    """Host seconds per stage, summed over threads (decode and write run in parallel pools)."""

    sizes: float = 0.0
    decode: float = 0.0
    prepare: float = 0.0
    wait_for_input: float = 0.0
    dispatch: float = 0.0
    wait_for_device: float = 0.0
    convert: float = 0.0
    write: float = 0.0


def _decode(item: WorkItem) -> np.ndarray:
    from zsp_jax.data.decode import decode_image

    with open(item.path, "rb") as f:
        data = f.read()
    return decode_image(data, item.path, exif=item.exif)


def _entry(item: WorkItem, **fields: Any) -> dict[str, Any]:
    return {"name": item.name, "path": item.path, **fields}


def run_job(labeller: Any, items: Sequence[WorkItem], out_dir: str, *, threads: tuple[int, int] = (4, 4),
            prefetch: int = 2, process_index: int = 0, process_count: int = 1, progress: bool = True,
            retry_failed: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Labels ``items`` into ``out_dir`` (layout: ``zsp_jax.label.outputs``); returns this process's summary.

    Args:
      labeller: a ``zsp_jax.label.labeller.Labeller``.
      items: every image of the job (all processes pass the same list).
      threads: (decode threads, write threads).
      prefetch: batches decoded and prepared ahead of the device.
      process_index, process_count: this process among the job's processes.
      retry_failed: label again images the manifest reports as failed.
    """
    import tqdm

    from zsp_jax.data import pseudo_labels

    t_start = time.perf_counter()
    o = labeller.options
    pseudo_labels.check_unique(i.name for i in items)
    times = StageTimes()
    previous = O.read_manifests(out_dir)
    finished = {n for n, e in previous.items() if e.get("status") == "ok" or (e.get("status") == "failed"
                                                                             and not retry_failed)}
    todo = [i for i in items if i.name not in finished]
    t0 = time.perf_counter()
    sized, unreadable = scan_sizes(todo, threads[0], progress and process_index == 0)
    times.sizes = time.perf_counter() - t0
    groups: dict[Bucket, list[WorkItem]] = collections.defaultdict(list)
    size_of: dict[str, tuple[int, int]] = {}
    for item, hw in sorted(sized, key=lambda x: x[0].name):
        groups[labeller.bucket_for(hw)].append(item)
        size_of[item.name] = hw
    mine = split_work(groups, labeller.tuning.images_per_device, process_index, process_count)
    my_unreadable = [(i, r) for k, (i, r) in enumerate(unreadable) if k % process_count == process_index]
    n_mine = sum(len(v) for _, v in mine) + len(my_unreadable)

    manifest = O.Manifest(out_dir, process_index, process_count)
    counts = collections.Counter()
    failures: list[dict[str, str]] = []
    lock = threading.Lock()
    bar = tqdm.tqdm(total=n_mine, desc=f"labelling ({len(items) - len(todo)} done before)", unit="img",
                    disable=not progress, dynamic_ncols=True)

    def fail(item: WorkItem, reason: str) -> None:
        manifest.append(_entry(item, status="failed", error=reason, process=process_index))
        with lock:
            counts["failed"] += 1
            failures.append({"name": item.name, "path": item.path, "reason": reason})
            bar.set_postfix(failed=counts["failed"], refresh=False)
            bar.update(1)

    for item, reason in my_unreadable:
        fail(item, reason)

    # Batches of whole groups per bucket: batch_size = devices x images_per_device.
    calls = [(bucket, its[s:s + labeller.batch_size]) for bucket, its in mine
             for s in range(0, len(its), labeller.batch_size)]
    decode_pool = cf.ThreadPoolExecutor(threads[0], thread_name_prefix="label-decode")
    write_pool = cf.ThreadPoolExecutor(threads[1], thread_name_prefix="label-write")
    write_slots = threading.BoundedSemaphore(2 * labeller.batch_size + threads[1])
    clock = _DeviceClock()

    def prepare(item: WorkItem) -> tuple[WorkItem, Any, str | None, float, float]:
        t0 = time.perf_counter()
        try:
            image = _decode(item)
        except Exception as e:  # noqa: BLE001 - reported in the manifest, the run goes on
            return item, None, str(e), time.perf_counter() - t0, 0.0
        t1 = time.perf_counter()
        try:
            prepared = labeller.prepare(image)
        except Exception as e:  # noqa: BLE001
            return item, None, f"cannot prepare: {type(e).__name__}: {e}", t1 - t0, time.perf_counter() - t1
        return item, prepared, None, t1 - t0, time.perf_counter() - t1

    def write(item: WorkItem, result: Any, prepared: Any, device_s: float) -> None:
        try:
            t0 = time.perf_counter()
            paths = O.output_paths(out_dir, item.name, confidence=o.write_confidence, segments=o.write_segments,
                                   overlays=o.write_overlays)
            O.write_image_outputs(paths, item.name, result, prepared.image if o.write_overlays else None)
            dt = time.perf_counter() - t0
            hist = np.bincount(result.label.reshape(-1), minlength=256)
            h, w = result.label.shape
            manifest.append(_entry(
                item, status="ok", label=os.path.relpath(paths["label"], out_dir), exif=item.exif, height=h, width=w,
                work_size=list(prepared.work_hw), bucket=[prepared.bucket.height, prepared.bucket.width],
                segments=result.num_segments, pixels={str(v): int(c) for v, c in enumerate(hist) if c},
                covered=round(1.0 - hist[255] / (h * w), 6), warnings=result.warnings,
                seconds={"device": round(device_s, 4), "write": round(dt, 4)}, process=process_index))
            with lock:
                times.write += dt
                counts["labelled"] += 1
                bar.update(1)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: report the image, keep going
            fail(item, f"cannot write outputs: {type(e).__name__}: {e}")
        finally:
            write_slots.release()

    pending: collections.deque = collections.deque()
    stragglers: dict[Bucket, list[tuple[WorkItem, Any]]] = collections.defaultdict(list)

    def submit(k: int) -> None:
        if k < len(calls):
            pending.append([decode_pool.submit(prepare, item) for item in calls[k][1]])

    def launch(batch: list[tuple[WorkItem, Any]]) -> tuple[Any, list[tuple[WorkItem, Any]], float]:
        plan = labeller.plan_for(batch[0][1].bucket)
        if plan not in labeller.compile_seconds:
            b = plan.amg.bucket
            bar.write(f"compiling the program for {b.height}x{b.width} images "
                      f"({labeller.batch_size} per call) ...")
            labeller.compiled(plan)
            bar.write(f"  compiled in {labeller.compile_seconds[plan]:.1f} s; {labeller.memory[plan]}")
            if clock.intervals:  # the device waits for a program, not for input
                compile_in_window[0] += labeller.compile_seconds[plan]
        t0 = time.perf_counter()
        out = labeller.dispatch([p for _, p in batch])
        times.dispatch += time.perf_counter() - t0
        clock.started(out)
        return out, batch, time.perf_counter()

    def finish(flight: tuple[Any, list[tuple[WorkItem, Any]], float]) -> None:
        out, batch, t_dispatch = flight
        t0 = time.perf_counter()
        jax.block_until_ready(out)
        t1 = time.perf_counter()
        results = labeller.results(out, [p for _, p in batch])
        t2 = time.perf_counter()
        times.wait_for_device += t1 - t0
        times.convert += t2 - t1
        per_image = (t1 - t_dispatch) / len(batch)
        for (item, prepared), result in zip(batch, results):
            write_slots.acquire()
            write_pool.submit(write, item, result, prepared, per_image)

    compile_in_window = [0.0]
    in_flight = None
    try:
        for k in range(min(prefetch, len(calls))):
            submit(k)
        for k, (bucket, _) in enumerate(calls):
            t0 = time.perf_counter()
            prepared = [f.result() for f in pending.popleft()]
            times.wait_for_input += time.perf_counter() - t0
            submit(k + prefetch)
            batch = []
            for item, p, err, t_dec, t_prep in prepared:
                times.decode += t_dec
                times.prepare += t_prep
                if err is not None:
                    fail(item, err)
                elif p.bucket != bucket:  # the decoded size differs from the header's
                    stragglers[p.bucket].append((item, p))
                else:
                    batch.append((item, p))
            flight = launch(batch) if batch else None
            if in_flight is not None:
                finish(in_flight)
            in_flight = flight
        if in_flight is not None:
            finish(in_flight)
        for bucket, its in stragglers.items():
            for s in range(0, len(its), labeller.batch_size):
                finish(launch(its[s:s + labeller.batch_size]))
    finally:
        decode_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        manifest.close()
        bar.close()
    wall = time.perf_counter() - t_start
    busy, window = clock.busy()
    clock.close()
    window -= compile_in_window[0]
    n = counts["labelled"]
    return {
        "process": process_index, "processes": process_count, "images": len(items),
        "done_before": len(items) - len(todo), "assigned": n_mine, "labelled": n, "failed": counts["failed"],
        "failures": failures, "seconds": round(wall, 2), "images_per_s": round(n / wall, 3) if wall > 0 else None,
        "buckets": [[b.height, b.width, len(v)] for b, v in mine],
        "compile_seconds": {f"{p.amg.bucket.height}x{p.amg.bucket.width}": round(s, 2)
                            for p, s in labeller.compile_seconds.items()},
        "memory": {f"{p.amg.bucket.height}x{p.amg.bucket.width}": m for p, m in labeller.memory.items()},
        "stage_seconds": {k: round(v, 3) for k, v in dataclasses.asdict(times).items()},
        "device_busy_seconds": round(busy, 3),
        "device_idle_fraction": round(max(0.0, 1.0 - busy / window), 4) if window > 0 and n else None,
    }

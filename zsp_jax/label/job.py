"""A labelling job over a list of image files: resumable, streamed, host and device overlapped.

``run_job(labeller, items, out_dir)``:

1. resume: images with a manifest line are finished (done or reported as bad) and skipped;
   ``.tmp-*`` files a kill left are removed;
2. sizes: a thread pool reads every remaining image's header (size, EXIF orientation) — no
   pixels are kept, so a folder of 100,000 images costs a list of names and sizes; unreadable
   files are reported at once;
3. work split: images are grouped by size bucket (``Labeller.buckets_for`` over the sizes of
   every image of the job, finished ones included, so a resumed run buckets as the first did);
   across processes whole buckets are dealt to the least-loaded process (a bucket larger than a
   fair share is cut at group boundaries), so each process compiles only its buckets; within a
   bucket images go in name order, in groups of ``images_per_device``, so every image is computed
   in the same group whatever the number of devices or processes (the same bits);
4. the loop: decode + preparation run ``prefetch`` batches ahead in ``decode_threads`` threads;
   the device works on one batch while the host converts the previous one; ``write_threads``
   write the files, and each image's manifest line is appended after its files are in place;
   while the device works on a bucket, the next bucket's program compiles in the background;
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
from zsp_jax.label import outputs


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

    def started(self, device_outputs: Any) -> None:
        t0 = time.perf_counter()
        self.intervals.append((t0, self._pool.submit(lambda: (jax.block_until_ready(device_outputs),
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
    wait_for_compile: float = 0.0
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
    keep_extension = pseudo_labels.clashing_names(i.name for i in items)  # x.jpg beside x.png: both labelled
    times = StageTimes()
    previous = outputs.read_manifests(out_dir)
    finished = {n for n, e in previous.items() if e.get("status") == "ok" or (e.get("status") == "failed"
                                                                             and not retry_failed)}
    todo = [i for i in items if i.name not in finished]
    t0 = time.perf_counter()
    sized, unreadable = scan_sizes(todo, threads[0], progress and process_index == 0)
    times.sizes = time.perf_counter() - t0
    sized.sort(key=lambda x: x[0].name)
    names = {i.name for i in items}
    done_sizes = [(int(e["height"]), int(e["width"])) for n, e in sorted(previous.items())
                  if n in names and n in finished and e.get("status") == "ok" and "height" in e]
    groups: dict[Bucket, list[WorkItem]] = collections.defaultdict(list)
    for (item, _), bucket in zip(sized, labeller.buckets_for([hw for _, hw in sized] + done_sizes)):
        groups[bucket].append(item)
    bucket_of = {item.name: bucket for bucket, its in groups.items() for item in its}
    # Pieces end at multiples of the largest images_per_device "auto" may choose (each choice divides it).
    largest_group = labeller.batch_size // len(labeller.mesh.devices.flat)
    mine = split_work(groups, largest_group, process_index, process_count)
    my_unreadable = [(i, r) for k, (i, r) in enumerate(unreadable) if k % process_count == process_index]
    n_mine = sum(len(v) for _, v in mine) + len(my_unreadable)

    manifest = outputs.Manifest(out_dir, process_index, process_count)
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

    # Units of work prepared ahead: the most images a call can take (devices x the largest images_per_device);
    # each is dispatched in calls of its bucket's program's batch size (a divisor of it).
    calls = [(bucket, its[s:s + labeller.batch_size]) for bucket, its in mine
             for s in range(0, len(its), labeller.batch_size)]
    next_bucket = {bucket: following for (bucket, _), (following, _) in zip(mine, mine[1:])}
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
            prepared = labeller.prepare(image, bucket_of.get(item.name))
        except Exception as e:  # noqa: BLE001
            return item, None, f"cannot prepare: {type(e).__name__}: {e}", t1 - t0, time.perf_counter() - t1
        return item, prepared, None, t1 - t0, time.perf_counter() - t1

    def write(item: WorkItem, result: Any, prepared: Any, device_s: float) -> None:
        try:
            t0 = time.perf_counter()
            paths = outputs.output_paths(out_dir, item.name, confidence=o.write_confidence,
                                         segments=o.write_segments, overlays=o.write_overlays,
                                         keep_extension=item.name in keep_extension)
            outputs.write_image_outputs(paths, item.name, result, prepared.image if o.write_overlays else None)
            dt = time.perf_counter() - t0
            hist = np.bincount(result.label.reshape(-1), minlength=256)
            h, w = result.label.shape
            manifest.append(_entry(
                item, status="ok", label=os.path.relpath(paths["label"], out_dir), exif=item.exif, height=h, width=w,
                work_size=list(prepared.work_hw), bucket=[prepared.bucket.height, prepared.bucket.width],
                segments=result.num_segments, masks_survived=result.masks_survived,
                pixels={str(v): int(c) for v, c in enumerate(hist) if c},
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

    announced: set[Bucket] = set()

    def program_of(bucket: Bucket) -> Any:
        """The bucket's program; on first use says what was chosen, and starts compiling the next bucket's."""
        t0 = time.perf_counter()
        if bucket not in announced and bucket not in labeller.programs.programs:
            bar.write(f"compiling the program for {bucket.height}x{bucket.width} images ...")
        program = labeller.program(bucket)
        waited = time.perf_counter() - t0
        times.wait_for_compile += waited
        if clock.intervals:  # the device waits for a program, not for input
            compile_in_window[0] += waited
        if bucket not in announced:
            announced.add(bucket)
            bar.write(f"bucket {bucket.height}x{bucket.width}: {program.describe()}")
            if bucket in next_bucket:
                labeller.prefetch(next_bucket[bucket])
        return program

    def launch(batch: list[tuple[WorkItem, Any]]) -> tuple[Any, list[tuple[WorkItem, Any]], float]:
        program_of(batch[0][1].bucket)
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
            size = program_of(bucket).batch_size if batch else 1
            for start in range(0, len(batch), size):
                flight = launch(batch[start:start + size])
                if in_flight is not None:
                    finish(in_flight)
                in_flight = flight
        if in_flight is not None:
            finish(in_flight)
        for bucket, its in stragglers.items():
            size = program_of(bucket).batch_size
            for start in range(0, len(its), size):
                finish(launch(its[start:start + size]))
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
        "compile_seconds": {f"{b.height}x{b.width}": round(p.compile_seconds, 2)
                            for b, p in labeller.programs.programs.items()},
        "programs": {f"{b.height}x{b.width}": p.describe() for b, p in labeller.programs.programs.items()},
        "memory": {f"{b.height}x{b.width}": p.memory for b, p in labeller.programs.programs.items()},
        "stage_seconds": {k: round(v, 3) for k, v in dataclasses.asdict(times).items()},
        "device_busy_seconds": round(busy, 3),
        "device_idle_fraction": round(max(0.0, 1.0 - busy / window), 4) if window > 0 and n else None,
    }

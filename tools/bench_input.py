"""Benchmark of the UniMatch training input pipeline at configs/voc.py's batch and crop size.

    python tools/bench_input.py                 # workers 0 and os.cpu_count()
    python tools/bench_input.py --workers 0,4,8 --batches 40

Data: a generated VOC-layout dataset (textured shapes, JPEG, sides 375-500 px like VOC's
500x375 photos), written once to --root, read from its TFDS ArrayRecord build (the default
source). Figures:

1. host cost per image on one core: JPEG decode, weak view (resize/crop/flip), the two PIL strong
   views; this is what decides where the strong views run;
2. batches/s of the whole pipeline (labelled + unlabelled + mix streams, host part only) with
   the strong views on the device (default) and on the host, for each worker count;
3. ``device_augment.finalize`` (strong views + normalisation, jitted) batches/s on JAX's default
   device.

Deterministic: fixed seeds and data; pipeline timings are the best of 2 runs of --batches batches
after 4 warm-up batches (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

from absl import flags

import jax
import numpy as np

from zsp_jax.data import augment, decode, device_augment, pipeline, readers, sources, splits, synthetic
from zsp_jax.data import tfds_builders
from zsp_jax.utils import bench

from zsp_jax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _voc_config():
    spec = importlib.util.spec_from_file_location("voc_config", os.path.join(_REPO, "configs", "voc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _per_image_costs(examples: list[readers.Example], crop: int, n: int = 24) -> dict[str, float]:
    rng = np.random.default_rng(0)
    datas = []
    for ex in examples[:n]:
        with open(ex.image, "rb") as f:
            img_bytes = f.read()
        with open(ex.mask, "rb") as f:
            mask_bytes = f.read()
        datas.append((img_bytes, mask_bytes))
    out = {}

    def timed(name, fn):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for d in datas:
                fn(d)
            best = min(best, time.perf_counter() - t0)
        out[name] = 1e3 * best / len(datas)

    decoded = [(decode.decode_image(a), decode.decode_mask(b)) for a, b in datas]
    crops = [augment.weak_view(img, None, crop, rng)[0] for img, _ in decoded]
    timed("decode JPEG + PNG mask", lambda d: (decode.decode_image(d[0]), decode.decode_mask(d[1])))
    it = iter(range(10**9))
    timed("weak view, labelled", lambda d: augment.weak_view(*decoded[next(it) % len(decoded)], crop, rng))
    timed("weak view, unlabelled", lambda d: augment.weak_view(decoded[next(it) % len(decoded)][0], None, crop, rng))
    timed("2 strong views (PIL)", lambda d: [augment.strong_view(crops[next(it) % len(crops)], rng) for _ in (1, 2)])
    return out


def _rate(pipe: pipeline.TrainPipeline, batches: int, warmup: int = 4) -> float:
    """Best of 2 timed runs of ``batches`` consecutive batches, after ``warmup`` (worker start-up)."""
    it = iter(pipe)
    for _ in range(warmup):
        next(it)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = min(best, time.perf_counter() - t0)
    if hasattr(it, "close"):
        it.close()
    return batches / best


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/zsp_bench_input", help="where the generated data and its build go")
    p.add_argument("--num-images", type=int, default=96)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--workers", default=f"0,{os.cpu_count() or 1}")
    p.add_argument("--read-threads", type=int, default=None, help="default: configs/voc.py's data.read_threads")
    args = p.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

    cfg = _voc_config()
    crop, batch = cfg.train.crop_size, cfg.train.batch_size
    threads = args.read_threads or cfg.data.read_threads
    root = os.path.join(args.root, "VOC2012")
    synthetic.make_voc_like(root, num_train=args.num_images, num_val=2, size_range=(375, 500), seed=0)
    layout = readers.VocLayout(root)
    split_dir = os.path.join(args.root, "splits")
    splits.make_splits(layout, split_dir, ["1_4"], seed=0)
    labeled, unlabeled = splits.load_split(layout, split_dir, "1_4")
    build = tfds_builders.build("voc", root, os.path.join(args.root, "tfds"), rebuild_if_stale=True)
    names = tfds_builders.read_metadata(build)["names"]["train_aug"]
    index = {n: i for i, n in enumerate(names)}
    lab_src = sources.TfdsSource(build, "train_aug", [index[e.name] for e in labeled])
    unl_src = sources.TfdsSource(build, "train_aug", [index[e.name] for e in unlabeled], labeled=False)

    bench.print_header(f"training input pipeline, configs/voc.py: crop {crop}, batch {batch} labelled + {batch} "
                       f"unlabelled (+ {batch} mix), TFDS ArrayRecord source")
    print(f"   data: {args.num_images} generated JPEGs, sides 375-500 px; {threads} read thread(s) per process")
    print("-- host cost per image, one core (ms)")
    costs = _per_image_costs(layout.subset("train_aug"), crop)
    for k, v in costs.items():
        print(f"   {k:28s} {v:7.2f}")
    dec, wl, wu, strong = (costs[k] for k in costs)
    per_batch_dev = batch * (dec + wl) + batch * (dec + 2 * wu)
    per_batch_host = per_batch_dev + 2 * batch * strong
    print(f"   => host CPU per batch: {per_batch_dev:.0f} ms with strong views on the device, "
          f"{per_batch_host:.0f} ms on the host ({per_batch_host / per_batch_dev:.2f}x)")

    print(f"-- pipeline batches/s (host side, best of 2 x {args.batches} batches after 4 warm-up batches)")
    for strong_on_host in (False, True):
        for w in [int(x) for x in args.workers.split(",") if x]:
            pipe = pipeline.TrainPipeline(lab_src, unl_src, crop_size=crop, global_batch_size=batch, seed=0,
                                          num_classes=21, workers=w, read_threads=threads,
                                          strong_on_host=strong_on_host)
            r = _rate(pipe, args.batches)
            where = "host  " if strong_on_host else "device"
            print(f"   strong views on {where} workers={w:2d}: {r:6.2f} batches/s ({r * batch:6.1f} labelled + "
                  f"{r * batch:6.1f} unlabelled images/s)")

    print(f"-- device_augment.finalize (jit) on {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    pipe = pipeline.TrainPipeline(lab_src, unl_src, crop_size=crop, global_batch_size=batch, seed=0,
                                  num_classes=21, workers=0, read_threads=threads)
    host = next(iter(pipe))
    dev = jax.device_put(host)
    fn = jax.jit(device_augment.finalize)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(dev))
    compile_s = time.perf_counter() - t0
    t = bench.time_fn(lambda: fn(dev), warmup=1, repeats=5)
    print(f"   {1 / t:8.2f} batches/s ({1e3 * t:.1f} ms/batch: {4 * batch} strong views + normalisation); "
          f"first call incl. compile {compile_s:.1f} s")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

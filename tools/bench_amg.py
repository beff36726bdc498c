"""Benchmark: zsp_jax automatic mask generation (exact and fast modes) against segment-anything's.

Same random weights (every tensor of the reference randomised, then converted), same images
(scikit-image sample photos resized to one size), one process. Prints images per second of
each, the speed-ups, compile time and memory separately, achieved FLOP/s against the measured
matmul rate, and how far our masks are from the reference's (a realistic-size parity check).

Thresholds. With random weights and segment-anything's defaults no mask survives (predicted
IoUs are about 0.1 and every stability score is 0 at offset 1.0), which would make both
implementations skip most of their work. ``--calibrate`` (on by default) therefore sets
``pred_iou_thresh`` and ``stability_score_thresh`` (offset 0.05) to the medians of a cheap 8x8
probe, so that about a quarter of the candidates pass the filters, as with real weights; the NMS
and every other option keep their defaults.

Run (about 15 minutes for vit_b, 32x32 points, 2 images of 480x640 on 2 CPU cores; most of it
is the reference):

    python tools/bench_amg.py --variant vit_b --points-per-side 32 --images 2

``--phases`` times the steps of our exact mode on one image as programs of their own (encoder,
prompt decoding with and without the upscaling, the filters' statistics, the NMS, the kept masks
at full resolution) and prints the machine's load beside each figure, then stops:

    python tools/bench_amg.py --variant vit_b --points-per-side 32 --phases
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _rss_gb() -> float:
    from zsp_jax.utils.bench import peak_rss_bytes  # imported late: main() sets XLA flags first

    return peak_rss_bytes() / 1e9


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def time_phases(model, options, image, *, decoder_group: int = 4, mask_chunk: int = 4, repeats: int = 2) -> None:
    """Prints the seconds of each step of ``generate_padded`` on one image, each step compiled on its own."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zsp_jax.amg import Bucket, Plan, generate_padded, prepare_inputs
    from zsp_jax.amg.decoder import point_decoder
    from zsp_jax.amg.generate import decode_candidates, filter_candidates, gather_candidates
    from zsp_jax.amg.inputs import encoder_input
    from zsp_jax.amg.mask_chunks import scan_mask_chunks
    from zsp_jax.amg.nms import nms_padded
    from zsp_jax.utils import bench

    o = options
    plan = Plan.create(o, model.config.image_size, Bucket.for_size(image.shape[:2], o.bucket), mask_chunk=mask_chunk)
    layer = plan.layers[0]
    grid, grid_valid = (jnp.asarray(a) for a in plan.grid_arrays()[0])
    inputs = jax.tree.map(jnp.asarray, prepare_inputs([image], plan, as_uint8=True))
    crop_box, input_hw = inputs.crop_boxes[0][:, 0], inputs.input_hw[0][:, 0]
    graphdef, state = nnx.split(model)

    def decoder(state):
        return point_decoder(nnx.merge(graphdef, state), group=decoder_group)

    embed = jax.jit(lambda st, x: nnx.merge(graphdef, st).embed(encoder_input(x, input_hw, plan.image_size)))
    context = jax.jit(lambda st, e: decoder(st).image_context(e))

    def decode(st, ctx, skip_threshold):
        options_used = plan.options.replace(pred_iou_thresh=skip_threshold)
        used = Plan.create(options_used, plan.image_size, plan.bucket, mask_chunk=mask_chunk)
        return decode_candidates(decoder(st), ctx, grid, crop_box, input_hw, used.layers[0], used)

    decode = jax.jit(decode, static_argnums=2)
    filters = jax.jit(lambda low, iou: filter_candidates(low, iou, grid_valid, crop_box, input_hw, inputs.image_hw,
                                                         layer, plan))
    nms = jax.jit(lambda bx, sc, v: jax.vmap(lambda b, s, k: nms_padded(b, s, k, o.box_nms_thresh, o.max_masks,
                                                                      count_all=True))(bx, sc, v))

    def masks(low, idx, valid):
        k = o.max_masks
        low_kept = gather_candidates(low, idx)
        boxes = jnp.broadcast_to(crop_box[:, None], (1, k, 4))
        hw = jnp.broadcast_to(input_hw[:, None], (1, k, 2))
        return scan_mask_chunks(lambda c, m, _: (c + jnp.sum(m, dtype=jnp.int32), None), jnp.int32(0), low_kept,
                                hw, boxes, inputs.image_hw, plan, valid)[0]

    masks = jax.jit(masks)
    whole = jax.jit(lambda st, x: generate_padded(nnx.merge(graphdef, st).embed, decoder(st), x, plan,
                                                  return_masks=False, return_low_res=True))

    def timed(name, fn, *args):
        t = bench.time_fn(lambda: fn(*args), warmup=1, repeats=repeats)
        print(f"   phase {name}: {t:.2f} s (load {_load()})", flush=True)
        return fn(*args)

    threshold = o.pred_iou_thresh if o.pred_iou_thresh > 0 else 0.0
    filtered = (f"upscaling skipped below the IoU filter ({threshold})" if threshold > 0
                else "no IoU filter (pred_iou_thresh <= 0): every prompt upscaled")
    emb = timed("SAM encoder", embed, state, inputs.images[0][:, 0])
    ctx = timed("decoder image context", context, state, emb)
    timed("prompt decoding, transformer only (every upscaling skipped)", decode, state, ctx, 1e9)
    timed("prompt decoding, every prompt upscaled", decode, state, ctx, 0.0)
    low, iou = timed(f"prompt decoding, {filtered}", decode, state, ctx, threshold)
    keep, stability, boxes, _ = timed("IoU filter + stability scores + boxes + crop-edge filter", filters, low, iou)
    idx, valid, count = timed("box NMS", nms, boxes, iou, keep)
    timed("kept masks at full resolution (upsampled and thresholded, mask_chunk at a time)", masks, low, idx, valid)
    timed("generate_padded as the labeller calls it (all of the above but the kept masks)", whole, state, inputs)
    n_iou = int(jnp.sum(iou > o.pred_iou_thresh)) if o.pred_iou_thresh > 0 else iou.size
    upscaled = int(jnp.sum(jnp.any(iou.reshape(-1, 3) > threshold, axis=1))) if threshold > 0 else iou.size // 3
    print(f"   candidates {iou.size}, above the IoU filter {n_iou} (prompts upscaled {upscaled} of {iou.size // 3}), "
          f"after stability and edge {int(keep.sum())}, after NMS {int(count[0])}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b", help="vit_b, vit_l, vit_h or tiny")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--size", default="480x640", help="image size HxW")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    p.add_argument("--iou-quantile", type=float, default=0.5,
                   help="calibrate pred_iou_thresh at this quantile of the probe's predicted IoUs (random weights put "
                        "the median below 0, which turns the filter off; 0.75 keeps about a quarter of the candidates)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--decoder", default="amg", choices=["amg", "model"])
    p.add_argument("--phases", action="store_true", help="time each step of our exact mode on one image and stop")
    from zsp_jax.utils.bench import add_precision_flag

    add_precision_flag(p)
    args = p.parse_args(argv)

    from zsp_jax.references import torchvision_stub

    torchvision_stub.install()
    import jax
    import torch

    from zsp_jax.amg import AmgOptions, AutomaticMaskGenerator, Bucket
    from zsp_jax.amg.decoder import decode_flops_per_prompt
    from zsp_jax.models.sam import SamConfig
    from zsp_jax.models.sam.image_encoder import encoder_flops
    from zsp_jax.references.amg import match_records, reference_pair, sample_images
    from zsp_jax.utils import bench

    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"SAM automatic mask generation, {args.variant}, {args.points_per_side}x{args.points_per_side} "
                       f"points, {args.images} images of {args.size}", peak)
    print(bench.set_matmul_precision(args.matmul_precision))
    print(f"   torch threads: {threads}")
    h, w = (int(v) for v in args.size.split("x"))
    config = SamConfig.from_name(args.variant)
    t0 = time.perf_counter()
    ref_model, model = reference_pair(config, 0)
    print(f"   build + convert random weights: {time.perf_counter() - t0:.1f} s")
    images = sample_images([(h, w)] * args.images)

    # ------------------------------------------------------------------ thresholds
    base = AmgOptions(points_per_side=args.points_per_side, stability_score_offset=0.05)
    if args.calibrate:
        probe = AutomaticMaskGenerator(model, AmgOptions(points_per_side=8, pred_iou_thresh=0.0,
                                                         stability_score_thresh=0.0, stability_score_offset=0.05,
                                                         box_nms_thresh=1.0, mode="fast"),
                                       decoder=args.decoder).generate(images[0])
        iou_t = float(np.quantile([r["predicted_iou"] for r in probe], args.iou_quantile))
        stab_t = float(np.median([r["stability_score"] for r in probe]))
        base = base.replace(pred_iou_thresh=round(iou_t, 4), stability_score_thresh=round(stab_t, 4))
    print(f"   options: pred_iou_thresh={base.pred_iou_thresh} stability_score_thresh={base.stability_score_thresh} "
          f"stability_score_offset={base.stability_score_offset} box_nms_thresh={base.box_nms_thresh} "
          f"points_per_batch={base.points_per_batch} (other options: segment-anything's defaults)")
    if args.phases:
        time_phases(model, base, images[0])
        return

    # ------------------------------------------------------------------ FLOPs of the device work
    # Analytic: XLA's cost analysis counts a lax.map body once, and the CPU default chunks global
    # attention with lax.map, so its count of the encoder falls short.
    flops_embed = encoder_flops(config)
    flops_prompt = decode_flops_per_prompt(model) or 0.0
    n_prompts = args.points_per_side ** 2
    flops_image = (flops_embed or 0) + flops_prompt * n_prompts
    print(f"   device FLOPs per image: encoder {(flops_embed or 0) / 1e9:.0f} G + decoder "
          f"{flops_prompt / 1e9:.2f} G x {n_prompts} prompts = {flops_image / 1e9:.0f} GFLOP (every prompt upscaled)")

    # ------------------------------------------------------------------ ours
    results = {}
    for mode in ("exact", "fast"):
        options = base.replace(mode=mode)
        gen = AutomaticMaskGenerator(model, options, batch_size=len(jax.local_devices()), decoder=args.decoder)
        compile_s = gen.warmup((h, w))
        program = gen.program(Bucket.for_size((h, w), options.bucket))
        gen.generate_batch(images[:1])  # first run: allocations, thread pools
        t = time.perf_counter()
        records = gen.generate_batch(images)
        elapsed = time.perf_counter() - t
        results[mode] = (records, elapsed)
        print(f"-- ours ({mode}): {args.images / elapsed:.4f} images/s ({elapsed / args.images:.1f} s/image; device "
              f"{gen.timings.device:.1f} s, host pre {gen.timings.preprocess:.2f} s, "
              f"post {gen.timings.postprocess:.2f} s)"
              f" | compile {compile_s:.1f} s | {program.memory} | peak RSS so far {_rss_gb():.2f} GB"
              f" | {flops_image * args.images / elapsed / 1e9:.1f} GFLOP/s = "
              f"{100 * flops_image * args.images / elapsed / peak:.0f}% of matmul rate"
              f" | masks per image {[len(r) for r in records]}")

    # ------------------------------------------------------------------ reference
    if args.skip_reference:
        return
    from segment_anything import SamAutomaticMaskGenerator

    ref_gen = SamAutomaticMaskGenerator(ref_model, **base.reference_kwargs())
    with torch.no_grad():
        ref_gen.predictor.set_image(images[0])  # warm-up of the encoder path
        ref_gen.predictor.reset_image()
        t = time.perf_counter()
        ref_records = [ref_gen.generate(im) for im in images]
        ref_elapsed = time.perf_counter() - t
    print(f"-- reference: {args.images / ref_elapsed:.4f} images/s ({ref_elapsed / args.images:.1f} s/image)"
          f" | peak RSS so far {_rss_gb():.2f} GB | masks per image {[len(r) for r in ref_records]}")
    for mode, (records, elapsed) in results.items():
        print(f"== speed-up {mode}: x{ref_elapsed / elapsed:.2f}")

    # ------------------------------------------------------------------ parity at this size
    for mode, (records, _) in results.items():
        for i, (r, o) in enumerate(zip(ref_records, records)):
            m = match_records(r, o)
            d_iou = max([abs(r[a]["predicted_iou"] - o[b]["predicted_iou"]) for a, b in m.pairs] or [0.0])
            d_stab = max([abs(r[a]["stability_score"] - o[b]["stability_score"]) for a, b in m.pairs] or [0.0])
            print(f"   parity {mode} image {i}: reference {len(r)} masks, ours {len(o)}, matched at IoU>=0.99 "
                  f"{100 * m.ref_fraction:.1f}% / {100 * m.ours_fraction:.1f}%, max |d predicted_iou| {d_iou:.1e}, "
                  f"max |d stability| {d_stab:.1e}")
    # Every candidate (no filters, no NMS) of a 16x16 grid on one image: parity of the full-resolution
    # statistics at this size, and the deviation of the fast mode's subsampled statistics.
    side = min(args.points_per_side, 16)
    cand = base.replace(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, points_per_side=side,
                        max_masks=3 * side ** 2)
    with torch.no_grad():
        rc = SamAutomaticMaskGenerator(ref_model, **cand.reference_kwargs()).generate(images[0])
    ex = AutomaticMaskGenerator(model, cand, decoder=args.decoder).generate(images[0])
    fa = AutomaticMaskGenerator(model, cand.replace(mode="fast"), decoder=args.decoder).generate(images[0])
    for name, ours, theirs in (("exact vs reference", ex, rc), ("fast vs exact", fa, ex)):
        m = match_records(theirs, ours)
        d_iou = np.array([abs(theirs[a]["predicted_iou"] - ours[b]["predicted_iou"]) for a, b in m.pairs])
        d = np.array([abs(theirs[a]["stability_score"] - ours[b]["stability_score"]) for a, b in m.pairs])
        boxes = np.mean([theirs[a]["bbox"] == ours[b]["bbox"] for a, b in m.pairs])
        print(f"   candidates {name} ({len(theirs)} masks, {side}x{side} points, no filters, no NMS): matched at "
              f"IoU>=0.99 {100 * m.ref_fraction:.1f}% / {100 * m.ours_fraction:.1f}%, mean mask IoU "
              f"{m.ious.mean():.5f}, equal boxes {100 * boxes:.1f}%, |d predicted_iou| max {d_iou.max():.1e}, "
              f"|d stability| median {np.median(d):.1e} p95 {np.percentile(d, 95):.1e} max {d.max():.1e} "
              f"(scores {np.percentile([r['stability_score'] for r in theirs], 5):.2f}.."
              f"{np.percentile([r['stability_score'] for r in theirs], 95):.2f})")

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

"""Benchmark: the zsp_jax zero-shot labeller against the same pipeline built from the PyTorch references.

Both label the same image files with the same random weights (a segment-anything SAM and an
open_clip CLIP + gem-torch, every tensor randomised, converted for ours): decode, SAM automatic
masks, GEM dense features, masked-average pooling, classification, painting, writing the PNG.
The reference is ``zsp_jax.references.label_reference.ReferenceLabeller`` (segment-anything's
generator, gem-torch, torch interpolation, numpy rules) in a plain loop; ours is the labelling job
(``zsp_jax.label.job.run_job``: one compiled program per bucket, prefetching decode threads,
writer threads). Printed: images/s of each and the ratio, compile time and memory separately,
our per-stage breakdown (host: decode, preparation, writing; device: SAM encoder, prompt decoding
with filters and NMS, GEM, pooling and painting, each timed as its own program), the fraction of
time the device waited for the host, and achieved FLOP/s against the measured matmul rate.

Thresholds as ``tools/bench_amg.py``: with random weights nothing passes segment-anything's
default filters, so ``pred_iou_thresh`` / ``stability_score_thresh`` (offset 0.05) are set to the
medians of a cheap probe; the NMS keeps its default (with random weights it leaves few masks).

``--agreement`` also labels the images with many segments (no NMS) twice with ours: bilinear vs
area pooling, and (``--bf16``) float32 vs bfloat16, and prints the pixel agreement.

Run (about 15 minutes for vit_b, 32x32 points, 2 images of 480x640 on 2 CPU cores):

    python tools/bench_label.py --variant vit_b --points-per-side 32 --images 2 [--agreement] [--bf16]

``--mixed-sizes N`` instead labels a folder of N photos of N different sizes (longer side 320..1024,
both orientations, seeded) with the default settings and prints the compiled programs, the
compile time and the share of the run's wall time the labelling waited for compiles (ours only):

    python tools/bench_label.py --variant vit_b --points-per-side 32 --mixed-sizes 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def mixed_sizes(n: int, labeller, work: str) -> None:
    """Labels ``n`` photos of ``n`` sizes with ``labeller`` (a fresh one: nothing compiled yet) and prints where the
    time went: the programs, their compile seconds, and the wall time the labelling waited for them."""
    from PIL import Image

    from zsp_jax.label import job
    from zsp_jax.references.amg import sample_images

    rng = np.random.default_rng(0)
    sizes = set()
    while len(sizes) < n:
        long_side = int(rng.integers(320, 1025))
        short = int(long_side * rng.uniform(0.5, 1.0))
        sizes.add((short, long_side) if rng.random() < 0.6 else (long_side, short))
    folder = os.path.join(work, "mixed")
    os.makedirs(folder)
    items = []
    for i, im in enumerate(sample_images(sorted(sizes))):
        path = os.path.join(folder, f"img{i:03d}.jpg")
        Image.fromarray(im).save(path, quality=95)
        items.append(job.WorkItem(f"img{i:03d}.jpg", path))
    print(f"   {n} images, sizes {sorted(sizes)}")
    t = time.perf_counter()
    summary = job.run_job(labeller, items, os.path.join(work, "mixed_out"), progress=False)
    wall = time.perf_counter() - t
    compile_s = sum(summary["compile_seconds"].values())
    waited = summary["stage_seconds"]["wait_for_compile"]
    for bucket, line in summary["programs"].items():
        images = sum(c for h, w, c in summary["buckets"] if f"{h}x{w}" == bucket)
        print(f"   program {bucket} ({images} images): {line}")
    print(f"== {n} images of {n} sizes: {wall:.1f} s wall, {len(summary['programs'])} programs compiled in "
          f"{compile_s:.1f} s; the labelling waited {waited:.1f} s for compiles = {100 * waited / wall:.1f}% of the "
          f"wall time (compiles overlapped with labelling: {compile_s - waited:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b", help="SAM vit_b, vit_l, vit_h or tiny")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--size", default="480x640", help="image size HxW")
    p.add_argument("--clip-size", type=int, default=448)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--agreement", action="store_true", help="pooling (and --bf16) label agreement")
    p.add_argument("--bf16", action="store_true", help="with --agreement: bfloat16 vs float32 labels")
    p.add_argument("--mixed-sizes", type=int, default=0, help="label N images of N sizes; print the compile share")
    p.add_argument("--iou-quantile", type=float, default=0.5,
                   help="pred_iou_thresh at this quantile of the probe's predicted IoUs (the median is below 0 with "
                        "random weights, which turns the filter off; 0.75 keeps about a quarter of the candidates)")
    from zsp_jax.utils.bench import add_precision_flag

    add_precision_flag(p)
    args = p.parse_args(argv)

    from zsp_jax.references import torchvision_stub

    torchvision_stub.install()
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from PIL import Image

    from zsp_jax.amg import AmgOptions, AutomaticMaskGenerator
    from zsp_jax.amg.decoder import decode_flops_per_prompt, point_decoder
    from zsp_jax.amg.generate import generate_padded
    from zsp_jax.label import job
    from zsp_jax.label.classes import load_classes
    from zsp_jax.label.labeller import Labeller
    from zsp_jax.label.options import LabelOptions, default_label_config
    from zsp_jax.models.clip import ClipTokenizer
    from zsp_jax.models.clip.convert import convert_state_dict
    from zsp_jax.models.sam import SamConfig
    from zsp_jax.models.sam.image_encoder import encoder_flops
    from zsp_jax.references.amg import reference_pair, sample_images
    from zsp_jax.references.clip import gem_reference, open_clip_vit_b16
    from zsp_jax.references.label_reference import ReferenceLabeller
    from zsp_jax.utils import bench

    threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"zero-shot labeller, SAM {args.variant} {args.points_per_side}x{args.points_per_side} points "
                       f"+ CLIP ViT-B/16 GEM at {args.clip_size}, {args.images} images of {args.size}", peak)
    print(bench.set_matmul_precision(args.matmul_precision))
    print(f"   torch threads: {threads}")
    h, w = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    sam_config = SamConfig.from_name(args.variant)
    ref_sam, sam = reference_pair(sam_config, 0)
    ref_clip = open_clip_vit_b16(quick_gelu=True, seed=0)
    gem_wrapper = gem_reference(ref_clip)
    clip = convert_state_dict(ref_clip.state_dict(), "open_clip", act="quick_gelu").build()
    tokenizer = ClipTokenizer.load()
    print(f"   build + convert random weights: {time.perf_counter() - t0:.1f} s")

    work = tempfile.mkdtemp(prefix="bench_label_")
    os.makedirs(os.path.join(work, "images"))
    images = sample_images([(h, w)] * args.images)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(work, "images", f"img{i}.jpg"), quality=95)
    items = [job.WorkItem(f"img{i}.jpg", os.path.join(work, "images", f"img{i}.jpg")) for i in range(args.images)]

    # ------------------------------------------------------------------ thresholds (as bench_amg)
    probe = AutomaticMaskGenerator(sam, AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                                   stability_score_offset=0.05, box_nms_thresh=1.0,
                                                   mode="fast")).generate(images[0])
    c = default_label_config()
    c.clip_size = args.clip_size
    c.amg.points_per_side = args.points_per_side
    c.amg.stability_score_offset = 0.05
    c.amg.pred_iou_thresh = round(float(np.quantile([r["predicted_iou"] for r in probe], args.iou_quantile)), 4)
    c.amg.stability_score_thresh = round(float(np.median([r["stability_score"] for r in probe])), 4)
    c.threshold = 0.0
    options = LabelOptions.from_config(c, load_classes("voc"))
    print(f"   AMG: pred_iou_thresh={c.amg.pred_iou_thresh} stability_score_thresh={c.amg.stability_score_thresh} "
          f"offset 0.05, NMS {c.amg.box_nms_thresh}; 20 VOC classes, cosine threshold {c.threshold}")

    if args.mixed_sizes:
        mixed_sizes(args.mixed_sizes, Labeller(sam, clip, tokenizer, options), work)
        return

    # ------------------------------------------------------------------ ours, end to end
    lab = Labeller(sam, clip, tokenizer, options)
    bucket = lab.bucket_for((h, w))
    program = lab.program(bucket)
    plan = lab.plan_for(bucket, program.sizes)
    print(f"   program: {program.describe()}; {program.memory}")
    job.run_job(lab, items[:1], os.path.join(work, "warm"), progress=False)  # first run: allocations, pools
    t = time.perf_counter()
    summary = job.run_job(lab, items, os.path.join(work, "ours"), progress=False)
    ours_s = time.perf_counter() - t
    st = summary["stage_seconds"]

    # per-stage device programs, timed on their own
    gd, state = nnx.split(sam)
    cgd, cstate = nnx.split(clip)
    prep = lab.prepare(images[0])
    x = jnp.zeros((1, sam_config.image_size, sam_config.image_size, 3), jnp.float32)
    enc_fn = jax.jit(lambda s, a: nnx.merge(gd, s).embed(a))
    amg_inputs = jax.tree.map(jnp.asarray, prep.amg)
    amg_fn = jax.jit(lambda s, a: generate_padded(nnx.merge(gd, s).embed, point_decoder(
        nnx.merge(gd, s), group=program.sizes.decoder_group), a, plan.amg, return_masks=False, return_low_res=True))
    with jax.default_matmul_precision(lab.matmul_precision()):
        t_enc = bench.time_fn(lambda: enc_fn(state, x), repeats=2)
        t_amg = bench.time_fn(lambda: amg_fn(state, amg_inputs), repeats=2)
        clip_in = jnp.zeros((1, args.clip_size, args.clip_size, 3), jnp.float32)
        gem_fn = jax.jit(lambda s, a: nnx.merge(cgd, s).dense_features(a, options.gem, normalize=True).tokens)
        t_gem = bench.time_fn(lambda: gem_fn(cstate, clip_in), repeats=2)
        flops_gem = bench.compiled_flops(gem_fn, cstate, clip_in) or 0.0
    t_full = ours_s / args.images - (st["decode"] + st["prepare"] + st["write"]) / args.images
    t_pool = max(0.0, t_full - t_amg - t_gem)
    flops_prompt = decode_flops_per_prompt(sam) or 0.0
    flops_image = (encoder_flops(sam_config) or 0) + flops_prompt * args.points_per_side ** 2 + flops_gem
    print(f"-- ours: {args.images / ours_s:.4f} images/s ({ours_s / args.images:.1f} s/image) | "
          f"{flops_image / 1e9:.0f} GFLOP per image, {flops_image * args.images / ours_s / 1e9:.0f} GFLOP/s = "
          f"{100 * flops_image * args.images / ours_s / peak:.0f}% of the matmul rate | device idle "
          f"{100 * (summary['device_idle_fraction'] or 0):.1f}% of the time (waiting for the host)")
    print(f"   per image: host decode {st['decode'] / args.images:.3f} s, preparation {st['prepare'] / args.images:.3f} s, "
          f"writing {st['write'] / args.images:.3f} s (host stages run in threads beside the device); device: "
          f"SAM encoder {t_enc:.2f} s, prompt decoding + filters + NMS {t_amg - t_enc:.2f} s, GEM {t_gem:.2f} s, "
          f"pooling + classes + painting {t_pool:.2f} s (the rest of the program)")

    # ------------------------------------------------------------------ reference
    if not args.skip_reference:
        from segment_anything.utils.transforms import ResizeLongestSide  # noqa: F401 - import cost outside timing

        from zsp_jax.data.decode import encode_png

        texts, _ = options.classes.prompt_rows()
        ref = ReferenceLabeller(ref_sam, options.amg.reference_kwargs(), ref_clip, gem_wrapper, texts,
                                options.rules(), clip_size=args.clip_size)
        with torch.no_grad():
            ref.generator.predictor.set_image(images[0])  # warm-up of the encoder path
            ref.generator.predictor.reset_image()
        t = time.perf_counter()
        ref_maps, t_dec, t_write = [], 0.0, 0.0
        for item in items:
            a = time.perf_counter()
            im = np.asarray(Image.open(item.path).convert("RGB"))
            b = time.perf_counter()
            label, _ = ref.label(im)
            cpos = time.perf_counter()
            with open(os.path.join(work, os.path.basename(item.path) + ".ref.png"), "wb") as f:
                f.write(encode_png(label))
            t_dec += b - a
            t_write += time.perf_counter() - cpos
            ref_maps.append(label)
        ref_s = time.perf_counter() - t
        rt = ref.timings
        print(f"-- reference: {args.images / ref_s:.4f} images/s ({ref_s / args.images:.1f} s/image): decode "
              f"{t_dec / args.images:.3f} s, SAM automatic masks {rt.amg / args.images:.1f} s, GEM "
              f"{rt.gem / args.images:.2f} s, pooling + painting {rt.pooling / args.images:.2f} s, writing "
              f"{t_write / args.images:.3f} s per image")
        print(f"== speed-up: x{ref_s / ours_s:.2f}")
        from zsp_jax.data.decode import decode_mask

        agree = []
        for item, ref_map in zip(items, ref_maps):
            with open(os.path.join(work, "ours", "labels", item.name[:-4] + ".png"), "rb") as f:
                agree.append(float(np.mean(decode_mask(f.read()) == ref_map)))
        print(f"   label maps equal to the reference on {100 * np.mean(agree):.2f}% of the pixels")

    # ------------------------------------------------------------------ agreement of variants
    if args.agreement:
        many = c.copy_and_resolve_references()
        many.amg.box_nms_thresh = 1.0
        many.amg.max_masks = 256
        many.no_class = "none"  # every segment keeps its best class: the comparison sees many classes
        maps = {}
        variants = [("bilinear", "float32"), ("area", "float32")] + ([("bilinear", "bfloat16")] if args.bf16 else [])
        for pooling, dtype in variants:
            many.pooling = pooling
            opt = LabelOptions.from_config(many, load_classes("voc"))
            if dtype == "bfloat16":
                from zsp_jax.models.clip.convert import build_clip
                from zsp_jax.models.sam.convert import from_state_dict
                from zsp_jax.utils.weights import flat_weights

                s16 = from_state_dict(ref_sam.state_dict(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                      source_name="ref")
                c16 = build_clip(clip.config, flat_weights(clip), source_name="ours", dtype=jnp.bfloat16)
                labeller = Labeller(s16, c16, tokenizer, opt)
            else:
                labeller = Labeller(sam, clip, tokenizer, opt)
            t = time.perf_counter()
            maps[pooling, dtype] = [r.label for r in labeller.label(images)]
            print(f"   {pooling} pooling, {dtype}: {time.perf_counter() - t:.1f} s for {args.images} images "
                  f"(compile included), classes {sorted(set(np.unique(np.concatenate([m.ravel() for m in maps[pooling, dtype]])).tolist()))}")
        base_maps = maps["bilinear", "float32"]
        for key, m in maps.items():
            if key != ("bilinear", "float32"):
                agree = np.mean([np.mean(a == b) for a, b in zip(base_maps, m)])
                print(f"== label agreement of {key[0]} / {key[1]} with bilinear / float32: {100 * agree:.2f}% of pixels")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

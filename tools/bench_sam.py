"""Benchmark: SAM image encoder and prompt decoding, zsp_jax against segment-anything, same weights and inputs.

    python tools/bench_sam.py [--variant vit_b] [--batch 1] [--points 64] [--repeats 3]
                              [--dtype float32|bfloat16] [--param-dtype float32|bfloat16]
                              [--no-reference]

Both models hold the same weights: ``sam_model_registry[variant]`` with every tensor randomised
(seed 0), converted with the production rules. Inputs are deterministic: a photograph
(scikit-image's chelsea, 300 x 451) preprocessed to 1024 x 1024 and replicated ``--batch``
times, and a ``sqrt(points)``-per-side grid of single foreground points decoded in one batch
with ``multimask_output=True`` (the AMG workload: 64 points per batch by default).

Printed per stage: ms per call for ours and the reference, the speed-up, our achieved FLOP/s
(analytic count of the encoder; XLA's count for the decoder) against the machine's measured
fp32 matmul rate, the jit compile times, and the parity of the two outputs on these inputs
(relative error max|a-b|/max|b| of embeddings, low-res logits and IoU predictions). With
``--dtype bfloat16`` the deviation from our own float32 outputs is printed too: relative
errors, and the IoU and pixel agreement of the binarised masks at the original image size.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("vit_b", "vit_l", "vit_h"), default="vit_b")
    p.add_argument("--batch", type=int, default=1, help="images per encoder call")
    p.add_argument("--points", type=int, default=64, help="single-point prompts per decoder call (a square)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="our weight dtype (default: the compute dtype)")
    p.add_argument("--no-reference", action="store_true", help="skip segment-anything (ours only)")
    from zsp_jax.utils.bench import add_precision_flag

    add_precision_flag(p)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from zsp_jax.models.sam import SamConfig, from_state_dict, postprocess_masks, preprocess
    from zsp_jax.models.sam.image_encoder import encoder_flops
    from zsp_jax.references import sam as sam_refs
    from zsp_jax.references import torchvision_stub
    from zsp_jax.utils import bench

    torchvision_stub.install()
    threads = bench.set_torch_threads()
    torch.manual_seed(0)
    peak = bench.matmul_rate()
    config = SamConfig.from_name(args.variant)
    dtype = jnp.dtype(args.dtype)
    param_dtype = jnp.dtype(args.param_dtype or args.dtype)
    bench.print_header(f"SAM {args.variant}, {config.image_size}x{config.image_size}, batch {args.batch}, "
                       f"{args.points} points multimask, ours in {dtype.name} (weights {param_dtype.name})", peak)
    print(bench.set_matmul_precision(args.matmul_precision))
    print(f"   torch {torch.__version__}, {threads} threads; XLA flags: "
          f"{__import__('os').environ.get('XLA_FLAGS', '') or '(none)'}")

    ref = sam_refs.registry_sam(args.variant, seed=0)
    sd = ref.state_dict()
    ours32 = from_state_dict(sd, config=config)
    ours = ours32 if dtype == jnp.float32 and param_dtype == jnp.float32 else from_state_dict(
        sd, config=config, dtype=dtype, param_dtype=param_dtype)

    import skimage.data

    photo = skimage.data.chelsea()
    h, w = photo.shape[:2]
    x, input_size = preprocess(photo, config.image_size)
    images = np.repeat(x[None], args.batch, axis=0)
    side = max(1, math.isqrt(args.points))
    n = side * side
    grid = (np.stack(np.meshgrid((np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side), -1)
            .reshape(n, 1, 2) * [input_size[1], input_size[0]]).astype(np.float32)
    labels = np.ones((n, 1), np.int32)

    def jitted(model):
        graphdef, state = nnx.split(model)
        embed = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))
        decode = jax.jit(lambda s, e, c, lab: nnx.merge(graphdef, s).decode(e, c, lab, multimask_output=True))
        return state, embed, decode

    state, embed, decode = jitted(ours)
    xi = jnp.asarray(images)
    t0 = time.perf_counter()
    embed_c = embed.lower(state, xi).compile()
    compile_embed = time.perf_counter() - t0
    emb = embed_c(state, xi)
    ci, li = jnp.asarray(grid)[None], jnp.asarray(labels)[None]
    e1 = emb[:1]
    t0 = time.perf_counter()
    decode_c = decode.lower(state, e1, ci, li).compile()
    compile_decode = time.perf_counter() - t0
    dec_flops = bench.compiled_flops(decode, state, e1, ci, li)
    t_embed = bench.time_fn(lambda: embed_c(state, xi), warmup=1, repeats=args.repeats)
    t_decode = bench.time_fn(lambda: decode_c(state, e1, ci, li), warmup=1, repeats=args.repeats)
    low, iou = decode_c(state, e1, ci, li)

    t_ref_embed = t_ref_decode = None
    ref_emb = ref_low = ref_iou = None
    if not args.no_reference:
        timgs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            ref_emb_t = ref.image_encoder(timgs)
        t_ref_embed = bench.time_fn(lambda: _no_grad(ref.image_encoder, timgs), warmup=0,
                                    repeats=max(1, args.repeats - 1))
        coords_t, labels_t = torch.from_numpy(grid), torch.from_numpy(labels)

        def ref_decode():
            return sam_refs.reference_decode(ref, ref_emb_t[:1], coords_t, labels_t, multimask_output=True)

        ref_low, ref_iou = ref_decode()
        t_ref_decode = bench.time_fn(ref_decode, warmup=1, repeats=args.repeats)
        ref_emb = ref_emb_t.numpy().transpose(0, 2, 3, 1)

    rows = [
        bench.Comparison(f"image encoder x{args.batch}", t_embed, t_ref_embed, encoder_flops(config, args.batch),
                         peak),
        bench.Comparison(f"decode {n} points", t_decode, t_ref_decode, dec_flops, peak),
    ]
    for r in rows:
        print("   " + r.line())
    print(f"   throughput: {args.batch / t_embed:.3f} images/s and {n / t_decode:.1f} prompts/s (ours)"
          + ("" if t_ref_embed is None else
             f", {args.batch / t_ref_embed:.3f} images/s and {n / t_ref_decode:.1f} prompts/s (reference)"))
    print(f"   jit compile: encoder {compile_embed:.1f} s, decoder {compile_decode:.1f} s")
    up = jax.jit(lambda lo: postprocess_masks(lo, input_size, (h, w), config.image_size))
    if ref_emb is not None:
        ref_full = ref.postprocess_masks(torch.from_numpy(ref_low), input_size, (h, w)).numpy()
        bad, near = sam_refs.mask_disagreement(np.asarray(up(low[0])) > 0, ref_full)
        differ = int(np.sum((np.asarray(up(low[0])) > 0) != (ref_full > 0)))
        print(f"   parity vs segment-anything: embedding {bench.relative_error(emb, ref_emb):.2e}, "
              f"low-res logits {bench.relative_error(low[0], ref_low):.2e}, "
              f"IoU predictions {bench.relative_error(iou[0], ref_iou):.2e} (relative error); "
              f"masks at {h}x{w}: {differ} of {ref_full.size} pixels differ, {bad} of them outside the "
              f"|logit| <= 1e-3 band ({near} pixels in it)")

    if ours is not ours32:
        s32, embed32, decode32 = jitted(ours32)
        emb32 = embed32(s32, xi)
        low32, iou32 = decode32(s32, emb32[:1], ci, li)
        m16 = np.asarray(up(low[0])) > 0
        m32 = np.asarray(up(low32[0])) > 0
        inter = np.sum(m16 & m32, axis=(-1, -2))
        union = np.sum(m16 | m32, axis=(-1, -2))
        ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        print(f"   {dtype.name} vs our float32: embedding {bench.relative_error(emb.astype(jnp.float32), emb32):.2e}, "
              f"low-res logits {bench.relative_error(low, low32):.2e}, IoU predictions "
              f"{bench.relative_error(iou, iou32):.2e}; masks at {h}x{w}: mean IoU {ious.mean():.4f} "
              f"(min {ious.min():.4f}), pixels agreeing {np.mean(m16 == m32):.5f}")
    return 0


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


if __name__ == "__main__":
    cli.run_tool(main)

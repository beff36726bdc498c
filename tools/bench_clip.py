"""Benchmark: GEM dense features (ViT-B/16 at 448x448), zsp_jax against the reference ``gem`` package.

    python tools/bench_clip.py [--batch 4] [--repeats 3] [--size 448] [--bf16] [--text]

Both run on the same randomised ViT-B/16 weights (an open_clip ``ViT-B-16-quickgelu``-shaped
model with every tensor randomised, converted with ``zsp_jax.models.clip.convert``) and the same
images. The reference is gem-torch's ``GEMWrapper`` (``model.visual(images)``, which returns the
GEM and the plain tokens) with the open_clip >= 2.24 layout fix of ``zsp_jax.references.clip``; ours
is ``dense_features_fn(model, GemConfig())``, jitted, which returns the GEM tokens and the global
embedding. Printed: images/s of both, the ratio, our achieved FLOP/s (XLA's count) against the
machine's measured matmul rate, and the parity of the two outputs on these inputs.

``--bf16`` adds our bfloat16 path and its deviation from fp32 (relative error and cosine of the
tokens and global embeddings, and agreement of the per-token best class against the 20 VOC
class embeddings). ``--text`` adds class-embedding throughput (prompts/s, 80 COCO classes x
the single template) against open_clip's ``encode_text``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=448, help="input height = width")
    p.add_argument("--bf16", action="store_true", help="also time bfloat16 and report its deviation from fp32")
    p.add_argument("--text", action="store_true", help="also time text encoding")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    from zsp_jax.utils.bench import add_precision_flag

    add_precision_flag(p)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zsp_jax.models.clip import GemConfig, build_clip, convert_state_dict
    from zsp_jax.references import clip as clip_refs
    from zsp_jax.utils import bench

    torch_threads = bench.set_torch_threads()
    peak = bench.matmul_rate()
    bench.print_header(f"CLIP ViT-B/16 + GEM dense features, {args.size}x{args.size}, batch {args.batch}", peak)
    print(bench.set_matmul_precision(args.matmul_precision))
    print(f"   torch threads: {torch_threads}")

    torch_model = clip_refs.open_clip_vit_b16(quick_gelu=True, seed=0)
    converted = convert_state_dict(torch_model.state_dict(), "open_clip", act="quick_gelu")
    images = clip_refs.random_images(args.batch, args.size, args.size, seed=0)
    gem_cfg = GemConfig()

    def jitted(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).dense_features(x, gem_cfg))
        return fn, state

    model = converted.build()
    fn, state = jitted(model)
    x = jnp.asarray(images)
    flops = bench.compiled_flops(fn, state, x)
    ours_s = bench.time_fn(lambda: fn(state, x), warmup=1, repeats=args.repeats)
    out = fn(state, x)

    ref_s = None
    if not args.no_reference:
        import torch

        wrapper = clip_refs.gem_reference(torch_model, depth=gem_cfg.depth)
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

        def reference():
            with torch.no_grad():
                return wrapper.model.visual(pixels)

        ref_s = bench.time_fn(reference, warmup=1, repeats=args.repeats)
        feat_gem, feat_ori = (t.numpy() for t in reference())
        b, gh, gw, d = out.tokens.shape
        err_tokens = bench.relative_error(np.asarray(out.tokens).reshape(b, -1, d), feat_gem[:, 1:])
        err_global = bench.relative_error(out.image_embeds, feat_ori[:, 0])
        print(f"   parity with the reference: GEM tokens rel. error {err_tokens:.2e}, global {err_global:.2e}")

    per = lambda t: None if t is None else t / args.batch  # noqa: E731 - rows are per image
    print(bench.Comparison("dense_features fp32", per(ours_s), per(ref_s), flops=per(flops), peak_flops=peak,
                           unit="image").line())
    if ref_s:
        print(f"   images/s: ours {args.batch / ours_s:.2f}, reference {args.batch / ref_s:.2f}, "
              f"ratio x{ref_s / ours_s:.2f}")

    if args.bf16:
        b16 = build_clip(converted.config, converted.weights, source_name="bench", dtype=jnp.bfloat16)
        fn16, state16 = jitted(b16)
        b16_s = bench.time_fn(lambda: fn16(state16, x), warmup=1, repeats=args.repeats)
        out16 = fn16(state16, x)
        print(bench.Comparison("dense_features bf16", per(b16_s), per(ref_s), flops=per(flops), peak_flops=peak,
                               unit="image").line())
        print("   bf16 vs fp32: " + deviation(out, out16, torch_model, converted, clip_refs.VOC_CLASSES))

    if args.text:
        text_bench(torch_model, converted, clip_refs.COCO_CLASSES, args.repeats, peak)
    return 0


def _cos(a, b):
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def deviation(out32, out16, torch_model, converted, classes) -> str:
    from zsp_jax.models.clip import ClassEmbedder, ClipTokenizer
    from zsp_jax.utils.bench import relative_error

    text = ClassEmbedder(converted.build(), ClipTokenizer.load())(list(classes))
    t32 = np.asarray(out32.tokens, np.float32)
    t16 = np.asarray(out16.tokens.astype("float32"))
    agree = np.mean(np.argmax(t32 @ text.T, -1) == np.argmax(t16 @ text.T, -1))
    g32 = np.asarray(out32.image_embeds, np.float32)
    g16 = np.asarray(out16.image_embeds.astype("float32"))
    return (f"tokens rel. error {relative_error(t16, t32):.2e}, min cosine {_cos(t16, t32).min():.5f}; "
            f"global rel. error {relative_error(g16, g32):.2e}, min cosine {_cos(g16, g32).min():.5f}; "
            f"best-VOC-class agreement per token {100 * agree:.2f}%")


def text_bench(torch_model, converted, classes, repeats, peak) -> None:
    import jax
    import torch
    from flax import nnx

    from zsp_jax.models.clip import ClipTokenizer
    from zsp_jax.utils import bench

    tok = ClipTokenizer.load()
    ids = tok([f"a photo of a {c}." for c in classes])
    length = int(np.ceil((np.argmax(ids, 1).max() + 1) / 8) * 8)
    graphdef, state = nnx.split(converted.build())
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))
    short = ids[:, :length]
    ours_s = bench.time_fn(lambda: fn(state, short), repeats=repeats)
    tids = torch.from_numpy(ids).long()

    def reference():
        with torch.no_grad():
            return torch_model.encode_text(tids)

    ref_s = bench.time_fn(reference, repeats=repeats)
    n = len(classes)
    full_s = bench.time_fn(lambda: fn(state, ids), repeats=repeats)
    for label, t, x in ((f"encode_text ({n} prompts, 77 tokens)", full_s, ids),
                        (f"encode_text ({n} prompts, cut to {length} tokens)", ours_s, short)):
        flops = bench.compiled_flops(fn, state, x)
        print(bench.Comparison(label, t / n, ref_s / n, flops=flops / n if flops else None, peak_flops=peak,
                               unit="prompt").line())


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run_tool(main)

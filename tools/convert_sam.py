"""Converts an official segment-anything checkpoint to zsp_jax's ``.safetensors`` format (once).

    python tools/convert_sam.py sam_vit_b_01ec64.pth sam_vit_b.safetensors [--variant vit_b]
                                [--allow-custom] [--check]

The variant (vit_b / vit_l / vit_h) is read from the tensors; ``--variant`` makes it a check
(a vit_l file with ``--variant vit_b`` fails and names the differing fields and shapes).
Every tensor of the file must be consumed and every weight of the model produced, with its
shape checked. The checkpoint is memory-mapped and converted tensor by tensor. The output
holds float32 weights keyed by the NNX state paths, and the model config in its metadata;
``zsp_jax.models.sam.load_sam(OUT)`` reads it without torch.

Exit status: 0 on success, 2 with one `error:` line on a conversion error (the message says what differs) or an
unusable path (missing source, output that is a directory or the source itself, unwritable).
"""

from __future__ import annotations

import argparse
import time

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="segment-anything checkpoint (.pth state_dict)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--variant", choices=("vit_b", "vit_l", "vit_h"), default=None,
                   help="check the file against this variant (default: infer it)")
    p.add_argument("--allow-custom", action="store_true",
                   help="accept an architecture that is none of vit_b / vit_l / vit_h")
    p.add_argument("--check", action="store_true", help="load the result and decode one point on a blank image")
    args = p.parse_args(argv)

    from zsp_jax.models.sam import convert as sam_convert
    from zsp_jax.utils.bench import peak_rss_bytes
    from zsp_jax.utils.weights import save_weights

    t0 = time.perf_counter()
    converted = cli.convert_and_save(
        args.source, args.out,
        lambda: sam_convert.read_checkpoint(args.source, variant=args.variant, allow_custom=args.allow_custom),
        lambda converted: save_weights(args.out, converted[0], sam_convert.metadata(converted[1], args.source)))
    if converted is None:
        return 2
    config = converted[1]
    del converted  # the weights: the peak RSS below is the conversion's
    peak = peak_rss_bytes() / 2**30
    print(f"{args.source} -> {args.out}: {config.name} (encoder {config.encoder_dim} x {config.encoder_depth}, "
          f"global attention at {list(config.global_attn_indexes)}, {config.image_size}px) "
          f"in {time.perf_counter() - t0:.1f} s, peak RSS {peak:.2f} GiB")

    if args.check:
        import jax
        import jax.numpy as jnp

        model, config = sam_convert.load_sam(args.out)
        s = config.image_size
        emb = jax.jit(lambda m, x: m.embed(x))(model, jnp.zeros((1, s, s, 3), jnp.float32))
        low, iou = jax.jit(lambda m, e, c, lab: m.decode(e, c, lab, multimask_output=True))(
            model, emb, jnp.full((1, 1, 1, 2), s / 2.0), jnp.ones((1, 1, 1), jnp.int32))
        print(f"check: embedding {tuple(emb.shape)}, low-res logits {tuple(low.shape)}, "
              f"IoU predictions {[round(float(v), 3) for v in iou[0, 0]]}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

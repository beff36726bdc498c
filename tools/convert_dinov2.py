"""Converts a DINOv2 checkpoint to zsp_jax's ``.safetensors`` format (once; loading then needs no torch).

    python tools/convert_dinov2.py SOURCE OUT.safetensors [--variant vit_b14|vit_b14_reg4|base|...]
                                   [--entry model_ema|model] [--allow-custom] [--num-heads N]
                                   [--interpolate-offset X] [--interpolate-antialias | --no-interpolate-antialias]
                                   [--check]

SOURCE is one of
  * an official DINOv2 checkpoint, e.g. dinov2_vitb14_pretrain.pth or dinov2_vits14_reg4_pretrain.pth
    (BlockChunk layouts ``blocks.{chunk}.{i}.…`` are read too);
  * a transformers Dinov2Model / Dinov2WithRegistersModel directory (config.json + weights), or
    its state_dict as a file;
  * a UniMatch V2 checkpoint (``latest.pth`` / ``best.pth``: ``{"model", "model_ema", ...}``, DDP
    ``module.`` prefixes) or segmenter state_dict: its ``backbone.*`` encoder is converted, from
    ``--entry`` (default: model_ema when present, the model V2's reported results come from).

The variant is read from the tensors; ``--variant`` makes it a check (a ViT-S file with
``--variant vit_b14`` fails and names the differing fields and shapes). Every tensor must be
consumed (V2's ``head.*`` is dropped deliberately) and every weight of the model produced,
with its shape checked. The output holds float32 weights keyed by the NNX state paths and the
model config in its metadata; ``zsp_jax.models.dinov2.load_dinov2(OUT)`` reads it without torch.

Exit status: 0 on success; 2 on an unusable input or output (missing, unreadable, truncated or
foreign source, another variant than asked for, output that is the source itself or a
directory, unwritable output), with one ``error:`` message on stderr.
"""

from __future__ import annotations

import argparse
import time

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="official DINOv2 .pth, transformers directory/state_dict, or UniMatch V2 checkpoint")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--variant", default=None,
                   help="check the file against this variant: vit_s14, vit_b14, vit_l14, vit_g14 (+ _reg4), or V2's "
                        "small / base / large / giant (default: infer it)")
    p.add_argument("--entry", choices=("model_ema", "model"), default=None,
                   help="UniMatch V2 checkpoints: which model to take (default: model_ema when present)")
    p.add_argument("--allow-custom", action="store_true", help="accept an architecture that is no named variant")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: width / 64 as in every DINOv2, or the transformers config)")
    p.add_argument("--interpolate-offset", type=float, default=None,
                   help="positional-embedding resampling offset (default: 0.1, or 0.0 with registers)")
    p.add_argument("--interpolate-antialias", action=argparse.BooleanOptionalAction, default=None,
                   help="antialiased resampling (default: off, on with registers)")
    p.add_argument("--check", action="store_true", help="load the result and run one 224 x 224 image")
    args = p.parse_args(argv)

    from zsp_jax.models.dinov2 import convert as dinov2_convert

    t0 = time.perf_counter()
    converted = cli.convert_and_save(
        args.source, args.out,
        lambda: dinov2_convert.convert_checkpoint(args.source, variant=args.variant, entry=args.entry,
                                                  allow_custom=args.allow_custom, num_heads=args.num_heads,
                                                  interpolate_offset=args.interpolate_offset,
                                                  interpolate_antialias=args.interpolate_antialias),
        lambda converted: dinov2_convert.save_dinov2(args.out, converted))
    if converted is None:
        return 2
    cfg = converted.config
    n = sum(int(v.size) for v in converted.weights.values())
    entry = f" [{converted.entry}]" if converted.entry else ""
    print(f"{args.source} ({converted.source_format}{entry}) -> {args.out}: {cfg.variant_name()}, {n / 1e6:.1f}M "
          f"params, width {cfg.embed_dim} x {cfg.depth} blocks, {cfg.num_register_tokens} registers, ffn {cfg.ffn}, "
          f"interpolate_offset {cfg.interpolate_offset} antialias {cfg.interpolate_antialias}, intermediate "
          f"blocks {list(cfg.intermediate_indices)} ({time.perf_counter() - t0:.1f} s)")

    if args.check:
        import jax
        import jax.numpy as jnp

        model = dinov2_convert.load_dinov2(args.out)
        feats = jax.jit(lambda m, x: m.intermediate_layers(x))(model, jnp.zeros((1, 224, 224, 3), jnp.float32))
        print(f"check: intermediate layers {[tuple(f.shape) for f in feats]}, "
              f"finite={all(bool(jnp.isfinite(f).all()) for f in feats)}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

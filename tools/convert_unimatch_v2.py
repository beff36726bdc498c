"""Converts a whole UniMatch V2 segmenter (DINOv2 encoder + DPT head) to zsp_jax's ``.safetensors`` format.

    python tools/convert_unimatch_v2.py SOURCE OUT.safetensors [--entry model_ema|model] [--allow-custom]

SOURCE is a checkpoint UniMatch V2 saves (``latest.pth`` / ``best.pth``: ``{"model", "model_ema", ...}``,
DDP ``module.`` prefixes) or a bare segmenter state_dict (``backbone.*`` + ``head.*``). ``--entry`` picks the
student (``model``) or the EMA teacher (``model_ema``, the default when present: the model V2's reported
results come from). The encoder size, the head's widths and the number of classes are read from the tensors;
every tensor must be consumed and every weight of the model produced, with its shape checked.

The output holds float32 weights keyed by the NNX state paths and the model config in its metadata:
``python -m zsp_jax.evaluate --checkpoint OUT`` and ``zsp_jax.models.dpt.convert.load_model(OUT)`` read it
without torch. (To start training from DINOv2's encoder alone, convert it with ``tools/convert_dinov2.py``.)

Exit status: 0 on success; 2 on an unusable input or output (missing, unreadable or foreign source, an entry
the file lacks, output that is the source itself or a directory, unwritable output), with one ``error:``
line on stderr.
"""

from __future__ import annotations

import argparse
import time

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="UniMatch V2 checkpoint (.pth) or segmenter state_dict")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--entry", choices=("model_ema", "model"), default=None,
                   help="which model of a V2 checkpoint (default: model_ema when present)")
    p.add_argument("--allow-custom", action="store_true", help="accept an encoder that is no named DINOv2 size")
    args = p.parse_args(argv)

    from zsp_jax.models.dpt import convert as dpt_convert

    t0 = time.perf_counter()
    converted = cli.convert_and_save(
        args.source, args.out,
        lambda: dpt_convert.convert_checkpoint(args.source, entry=args.entry, allow_custom=args.allow_custom),
        lambda converted: dpt_convert.save_converted(args.out, converted))
    if converted is None:
        return 2
    config = converted.config
    values = sum(int(v.size) for v in converted.weights.values())
    entry = f" [{converted.entry}]" if converted.entry else ""
    print(f"{args.source}{entry} -> {args.out}: {config.variant}, {config.num_classes} classes, "
          f"{values / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

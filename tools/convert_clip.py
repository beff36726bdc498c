"""Converts a CLIP checkpoint to zsp_jax's ``.safetensors`` format (once; loading then needs no torch).

    python tools/convert_clip.py SOURCE OUT.safetensors [--format hf|openai|open_clip]
                                 [--act gelu|quick_gelu] [--model-name NAME] [--vision-head-width N]
                                 [--no-tokenizer] [--check]

SOURCE is one of
  * a transformers CLIPModel directory (config.json + model.safetensors / pytorch_model.bin),
    e.g. a snapshot of openai/clip-vit-base-patch16;
  * an OpenAI CLIP ``.pt`` file (TorchScript archive as downloaded by ``clip.load``, or a plain
    state_dict), e.g. ViT-B-16.pt;
  * an open_clip checkpoint (``torch.save(model.state_dict())``, a training checkpoint, or
    ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` from the hub).

The format is detected (directory -> hf, TorchScript -> openai, else open_clip). The MLP
activation is read from a transformers config, is quick_gelu for OpenAI files, and for
open_clip follows ``--model-name`` (``ViT-B-16-quickgelu`` or ``...openai`` -> quick_gelu,
otherwise gelu; an open_clip file without ``--model-name`` is refused: its tensors do not tell the
two apart); ``--act`` overrides. Beside OUT the CLIP vocabulary is written to
``OUT_without_suffix.tokenizer/`` (vocab.json + merges.txt) so that tokenising works offline on
machines without open_clip; ``ClipTokenizer.load(that_dir)`` reads it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from zsp_jax import cli


def tokenizer_dir_for(out: str) -> str:
    base = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    return base + ".tokenizer"


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="transformers CLIP directory, OpenAI .pt, or open_clip checkpoint")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--format", choices=("hf", "openai", "open_clip"), default=None, help="source format (detected)")
    p.add_argument("--act", choices=("gelu", "quick_gelu"), default=None, help="override the MLP activation")
    p.add_argument("--model-name", default=None,
                   help="open_clip model name, e.g. ViT-B-16-quickgelu or ViT-H-14 (decides the activation and, "
                        "for ViT-H/g/bigG/e, the vision head width), or an open_clip model-config .json")
    p.add_argument("--vision-head-width", type=int, default=None,
                   help="width of one vision attention head (default: 64, or the model name's family)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the vocabulary beside OUT")
    p.add_argument("--check", action="store_true", help="load the result and run one image and one text")
    args = p.parse_args(argv)

    from zsp_jax.models.clip import convert as clip_convert
    from zsp_jax.models.clip.tokenizer import ClipTokenizer, _is_hf_tokenizer_dir

    t0 = time.perf_counter()
    converted = cli.convert_and_save(
        args.source, args.out,
        lambda: clip_convert.convert_checkpoint(args.source, fmt=args.format, act=args.act, model_name=args.model_name,
                                                vision_head_width=args.vision_head_width),
        lambda converted: clip_convert.save_clip(args.out, converted))
    if converted is None:
        return 2
    n = sum(int(np.prod(v.shape)) for v in converted.weights.values())
    cfg = converted.config
    print(f"{args.source} ({converted.source_format}) -> {args.out}: {cfg.variant_name()}, {n / 1e6:.1f}M params, "
          f"act={cfg.act}, {cfg.image_size}px/{cfg.patch_size}, embed {cfg.embed_dim} "
          f"({time.perf_counter() - t0:.1f} s)")

    if not args.no_tokenizer:
        src = args.source if converted.source_format == "hf" and _is_hf_tokenizer_dir(args.source) else None
        try:
            tok = ClipTokenizer.load(src, context_length=cfg.context_length)
        except FileNotFoundError as e:
            print(f"note: no tokenizer written ({e})")
        else:
            tok.save_pretrained(tokenizer_dir_for(args.out))
            print(f"tokenizer vocabulary ({tok.vocab_size} tokens) -> {tokenizer_dir_for(args.out)}")

    if args.check:
        import jax.numpy as jnp

        from zsp_jax.models.clip.model import encode_image_fn, encode_text_fn

        model = clip_convert.load_clip(args.out)
        img = encode_image_fn(model)(jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32))
        ids = np.zeros((1, 8), np.int32)
        ids[0, :3] = [49406, 320, 49407]
        txt = encode_text_fn(model)(ids)
        print(f"check: image embedding {tuple(img.shape)}, text embedding {tuple(txt.shape)}, "
              f"finite={bool(jnp.isfinite(img).all() and jnp.isfinite(txt).all())}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

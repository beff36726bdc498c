"""Converts DeepLabV3+ / backbone checkpoints from PyTorch to a zsp_jax ``.safetensors`` file.

Accepted inputs (format, architecture and class count are read from the tensors):

  UniMatch ImageNet backbones   pretrained/resnet50.pth, resnet101.pth (deep stem), xception.pth
  torchvision ResNets           resnet50-*.pth, resnet101-*.pth (plain stem; fc.* dropped)
  UniMatch-trained checkpoints  best.pth / latest.pth ({'model': ..., 'optimizer': ...}, 'module.' prefixes)

Examples:

  python tools/convert_backbone.py pretrained/resnet101.pth weights/resnet101_deep.safetensors --num-classes 21
  python tools/convert_backbone.py resnet50-11ad3fa6.pth weights/r50_tv.safetensors --num-classes 19 --variant resnet50
  python tools/convert_backbone.py exp/pascal/unimatch/r101/1464/best.pth weights/unimatch_voc_1464.safetensors

  python tools/convert_backbone.py exp/cityscapes/unimatch/r50/744/best.pth weights/unimatch_cs_744.safetensors \
      --output-stride 8 --multi-grid --aspp-rates 12 24 36

Output stride, multi-grid and ASPP rates change no tensor shape, so they cannot be read from
the file: give UniMatch's values for the checkpoint (PASCAL VOC / COCO: the defaults;
Cityscapes: the last example). They are stored in the converted file's config.

A backbone file converts to backbone weights only: loading it (``zsp_jax.models.deeplab.convert.load_model``)
initialises the ASPP, decoder and classifier randomly and says so. ``--variant`` (and
``--stem``) make the tool check that the file holds the model you expect.
"""

from __future__ import annotations

import argparse
import time

from zsp_jax import cli

VARIANTS = ("resnet50", "resnet101", "xception65")
BACKBONE_FIELDS = ("backbone", "resnet_blocks", "resnet_stem", "resnet_width", "xception_widths", "xception_middle")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="PyTorch checkpoint (.pth / .pt)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--variant", choices=VARIANTS, help="expected backbone; checked against the file")
    p.add_argument("--stem", choices=("deep", "plain"), help="expected ResNet stem; checked against the file")
    p.add_argument("--num-classes", type=int, help="classes of the head (required for a backbone file)")
    p.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32),
                   help="output stride stored in the config (default 16, UniMatch's)")
    p.add_argument("--multi-grid", action="store_true",
                   help="ResNet stage-4 dilations x(2, 2, 4), UniMatch's Cityscapes setting")
    p.add_argument("--aspp-rates", type=int, nargs=3, default=(6, 12, 18), metavar="R",
                   help="ASPP dilation rates stored in the config (default 6 12 18; Cityscapes: 12 24 36)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from zsp_jax.models.deeplab import DeepLabConfig
    from zsp_jax.models.deeplab.convert import (check_config, config_for, convert, detect_source,
                                                read_torch_checkpoint, save_converted)

    def read_and_convert():
        sd = read_torch_checkpoint(args.source)
        info = detect_source(sd, source_name=args.source)
        print(f"{args.source}: {info.describe()} ({len(sd)} tensors, format {info.format})")
        overrides = {"output_stride": args.output_stride, "aspp_rates": tuple(args.aspp_rates)}
        if args.multi_grid:
            overrides["resnet_multi_grid"] = True
        if args.num_classes is not None:
            overrides["num_classes"] = args.num_classes  # for a full checkpoint: checked against its classifier
        elif info.contents == "backbone":
            raise ValueError("a backbone file: give --num-classes for the head that will be initialised randomly")
        config = config_for(info, **overrides)
        if args.variant is not None or args.stem is not None:
            variant = args.variant or ("xception65" if info.config["backbone"] == "xception" else "resnet101")
            kw = {} if variant == "xception65" else {"stem": args.stem or info.config.get("resnet_stem", "deep")}
            named = getattr(DeepLabConfig, variant)(**kw)
            fields = BACKBONE_FIELDS if args.variant else ("backbone", "resnet_stem")
            check_config(info, config.replace(**{f: getattr(named, f) for f in fields}), source_name=args.source)
        weights, info = convert(sd, config, source_name=args.source)
        return weights, config, info

    t0 = time.perf_counter()
    converted = cli.convert_and_save(args.source, args.output, read_and_convert,
                                     lambda converted: save_converted(args.output, *converted))
    if converted is None:
        return 2
    weights, config, info = converted
    print(f"wrote {args.output}: {len(weights)} tensors, {sum(w.size for w in weights.values()) / 1e6:.2f}M values, "
          f"variant {config.variant}, {config.num_classes} classes, output stride {config.output_stride}"
          f"{', multi-grid' if config.resnet_multi_grid else ''}, ASPP rates {config.aspp_rates} "
          f"({time.perf_counter() - t0:.1f} s)")
    if info.contents == "backbone":
        print("note: backbone weights only; ASPP, decoder and classifier are randomly initialised when loaded")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

"""Writes a generated dataset in the VOC 2012 layout (textured shapes, masks, lists) and its splits.

    python tools/make_synthetic.py --root /tmp/synth/VOC2012 --num-train 64 --min-size 375 --max-size 500
    python -m zsp_jax.main --config configs/voc.py:split=1_4 --config.data.root=/tmp/synth/VOC2012 \
        --config.data.splits_dir=/tmp/synth/splits --config.data.tfds_dir=/tmp/synth/tfds

The same generator (``zsp_jax.data.synthetic.make_voc_like``) makes the data of the tests,
configs/smoke.py and tools/bench_input.py; handy to try a config end to end without downloading
anything.
"""

from __future__ import annotations

import argparse
import os

from zsp_jax.data import readers, splits, synthetic

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the VOC2012-style directory to write")
    p.add_argument("--num-train", type=int, default=24)
    p.add_argument("--num-val", type=int, default=8)
    p.add_argument("--num-aug-only", type=int, default=0, help="extra images with only SegmentationClassAug masks")
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="1_4,1_2", help="splits to write next to the root (splits/<name>)")
    p.add_argument("--splits-dir", default="", help="default: <root>/../splits")
    args = p.parse_args(argv)
    synthetic.make_voc_like(args.root, num_train=args.num_train, num_val=args.num_val,
                            num_aug_only=args.num_aug_only, size_range=(args.min_size, args.max_size), seed=args.seed)
    out = args.splits_dir or os.path.join(os.path.dirname(os.path.abspath(args.root)), "splits")
    names = [s for s in args.splits.split(",") if s]
    if names:
        for name, (n_l, n_u) in splits.make_splits(readers.VocLayout(args.root), out, names, args.seed).items():
            print(f"{out}/{name}: {n_l} labelled, {n_u} unlabelled")
    print(f"dataset: {args.root}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

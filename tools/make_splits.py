"""Writes seeded UniMatch-format splits (labeled.txt / unlabeled.txt per split, and val.txt).

    python tools/make_splits.py --dataset voc --root data/VOCdevkit/VOC2012 --out data/splits/voc
    python tools/make_splits.py --dataset coco --root data/coco --out data/splits/coco --splits 1_512,1_32

VOC: counts 92/183/366/732/1464 draw their labelled images from the 1,464 VOC train images and
fractions 1_16 ... 1_2 from train_aug (10,582); the unlabelled list is the rest of train_aug.
COCO: fractions 1_512 ... 1_32 of train2017. The same --seed gives the same files. To reuse
UniMatch's published splits instead, point config.data.splits_dir at their splits/pascal or
splits/coco directory.
"""

from __future__ import annotations

import argparse

from zsp_jax.data import readers, splits

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=readers.DATASETS, required=True)
    p.add_argument("--root", required=True, help="dataset root (VOC2012 directory, or the COCO root)")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per split)")
    p.add_argument("--splits", default="", help="comma-separated split names (default: all standard ones)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [s for s in args.splits.split(",") if s] or list(splits.SPLITS[args.dataset])
    layout = readers.make_layout(args.dataset, args.root)
    sizes = splits.make_splits(layout, args.out, names, args.seed)
    for name, (n_l, n_u) in sizes.items():
        print(f"{args.out}/{name}: {n_l} labelled, {n_u} unlabelled")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

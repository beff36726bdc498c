"""Makes COCO 2017's 81-class semantic masks from the instance annotations (pycocotools).

    python tools/prepare_coco.py --root data/coco

Expects <root>/train2017/, <root>/val2017/ and <root>/annotations/instances_{train,val}2017.json;
writes <root>/masks/<stem>.png (0 background, 1..80 things in COCO id order = UniMatch's class
order, 255 ignore). Overlaps: smaller instances on top. Crowd regions: ignore (255), or their
class with --crowd class. Existing masks are kept, so a killed run resumes. Then build the
ArrayRecord dataset and splits:

    python tools/make_splits.py --dataset coco --root data/coco --out data/splits/coco
    python -m zsp_jax.main --config configs/coco.py --config.data.root=data/coco
"""

from __future__ import annotations

import argparse
import os
import sys

import tqdm

from zsp_jax.data import coco

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--subsets", default="train,val", help="comma-separated: train, val")
    p.add_argument("--crowd", choices=("ignore", "class"), default="ignore")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    for subset in [s for s in args.subsets.split(",") if s]:
        ann = os.path.join(args.root, "annotations", f"instances_{subset}2017.json")
        if not os.path.isfile(ann):
            print(f"error: {ann} not found", file=sys.stderr)
            return 2
        with tqdm.tqdm(desc=f"masks {subset}2017", unit="img") as bar:
            n = coco.write_masks(ann, os.path.join(args.root, "masks"), crowd=args.crowd, workers=args.workers,
                                 progress=bar.update)
        print(f"{subset}2017: {n} masks in {os.path.join(args.root, 'masks')}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

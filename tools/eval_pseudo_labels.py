"""Evaluates a labeller output folder against ground truth (the trainer's mIoU), optionally per threshold.

    python tools/eval_pseudo_labels.py --out runs/photos --gt photos_gt/            # masks at <gt>/<relpath>.png
    python tools/eval_pseudo_labels.py --out runs/voc/pseudo_labels --voc-root data/VOCdevkit/VOC2012
    python tools/eval_pseudo_labels.py --out runs/photos --gt photos_gt/ --sweep 0.1:0.4:0.02   # needs segments/

Reads ``<out>/manifest.jsonl`` (or the per-process manifests) and ``<out>/classes.json``; writes
nothing unless ``--json PATH`` is given. Metrics: ``zsp_jax.label.quality`` (mIoU as UniMatch
computes it, per-class IoU, pixel accuracy, coverage; uncovered pixels as misses and as background).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from zsp_jax import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the labeller's output folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gt", help="folder of ground-truth masks at <gt>/<image path without extension>.png")
    g.add_argument("--voc-root", help="a VOC root: masks from SegmentationClass / SegmentationClassAug")
    p.add_argument("--sweep", default="", help="cosine thresholds start:stop:step or a,b,c (needs segments/)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--json", default="", help="write the result here")
    args = p.parse_args(argv)

    from zsp_jax.data.pseudo_labels import find_label
    from zsp_jax.label import outputs, quality
    from zsp_jax.label.labelling import parse_thresholds

    classes_file = os.path.join(args.out, "classes.json")
    if not os.path.isfile(classes_file):
        print(f"error: {args.out} is not a labeller output folder (no classes.json)", file=sys.stderr)
        return 2
    if args.sweep:  # checked before any work: the sweep re-scores each segment record
        parse_thresholds(args.sweep)
        if not os.path.isdir(os.path.join(args.out, "segments")):
            print(f"error: --sweep: {args.out} has no segments/ folder (label with --config.label.write_segments=True, "
                  f"or with --sweep, to write the per-segment records)", file=sys.stderr)
            return 2
    with open(classes_file) as f:
        names = json.load(f)["names"]
    entries = outputs.read_manifests(args.out)
    if os.path.isfile(os.path.join(args.out, "manifest.jsonl")):
        with open(os.path.join(args.out, "manifest.jsonl")) as f:
            entries = {**{e["name"]: e for e in map(json.loads, f)}, **entries}
    if args.gt:
        gt_of = {n: find_label(args.gt, n) for n in entries}
    else:
        from zsp_jax.data.readers import VocLayout

        layout = VocLayout(args.voc_root)
        gt_of = {n: next((m for m in layout.mask_candidates(n) if os.path.isfile(m)), None) for n in entries}
    pairs = quality.evaluation_pairs(args.out, entries, gt_of)
    result = quality.evaluate(pairs, names, threads=args.threads)
    print(quality.format_table(result))
    if args.sweep:
        with open(os.path.join(args.out, "label_settings.json")) as f:
            opts = json.load(f)["options"]
        seg_pairs = quality.evaluation_pairs(args.out, entries, gt_of, kind="segments")
        result["threshold_sweep"] = quality.sweep_thresholds(
            seg_pairs, parse_thresholds(args.sweep), names, uncovered=255 if opts["uncovered"] == "ignore" else 0,
            paint_order=opts["paint_order"], threads=args.threads)
        for r in result["threshold_sweep"]:
            print(f"  threshold {r['threshold']:.3f}: mIoU {r['miou']:.2f}, coverage {r['coverage']:.1f} %, "
                  f"uncovered as background {r['miou_uncovered_as_background']:.2f}")
    if args.json:
        from zsp_jax.utils.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0 if result.get("images") else 1


if __name__ == "__main__":
    cli.run_tool(main)

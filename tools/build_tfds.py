"""Builds the TFDS ArrayRecord dataset of VOC 2012 + SBD or COCO 2017 (once; no TensorFlow needed).

    python tools/build_tfds.py --dataset voc --root data/VOCdevkit/VOC2012 --tfds-dir data/tfds
    python tools/build_tfds.py --dataset coco --root data/coco --tfds-dir data/tfds --on-bad-input skip

``zsp_jax.main`` builds on first use with the same arguments (``config.data.root``,
``config.data.tfds_dir``, ``config.data.on_bad_input``); this tool does it ahead of time, for
example on a CPU machine before a TPU job. An existing build from the same, unchanged files is
reused; one made from other or changed files is refused unless ``--rebuild-if-stale``.
Exits 2 with an ``error:`` line naming the culprit (a missing root, a bad file, a stale build).
"""

from __future__ import annotations

import argparse
import json
import sys

from zsp_jax.data import bad_input, readers, tfds_builders

from zsp_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=readers.DATASETS, required=True)
    p.add_argument("--root", required=True, help="dataset root (VOC2012 directory, or the COCO root)")
    p.add_argument("--tfds-dir", required=True, help="where the build goes (config.data.tfds_dir)")
    p.add_argument("--on-bad-input", choices=bad_input.POLICIES, default="error",
                   help="error: stop and list every bad file | skip: leave them out, list them in the metadata")
    p.add_argument("--threads", type=int, default=None, help="decode/check threads (default: all cores)")
    p.add_argument("--rebuild-if-stale", action="store_true",
                   help="delete and rebuild a build made from other or changed files")
    args = p.parse_args(argv)
    try:
        out = tfds_builders.build(args.dataset, args.root, args.tfds_dir, on_bad_input=args.on_bad_input,
                                  threads=args.threads, rebuild_if_stale=args.rebuild_if_stale)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # BadInputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = tfds_builders.read_metadata(out)
    for subset, names in meta["names"].items():
        skipped = meta["skipped"].get(subset, [])
        print(f"{subset}: {len(names)} examples" + (f", {len(skipped)} skipped" if skipped else ""))
        for name, path, reason in skipped:
            print(f"   skipped {path}: {reason}")
    print(f"built {out}")
    print(json.dumps({"build": out}))
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

"""Draws docs/overview.png, the README's picture: an image, its SAM segments, its pseudo label, via the labeller.

    python tools/make_overview_figure.py --out docs/overview.png [--sam CKPT --clip CKPT --classes voc]

Without checkpoints it uses small random-weight models (``zsp_jax.models.random_checkpoints``), so the
segments and classes illustrate the outputs' form only; with real SAM / CLIP checkpoints it shows
real pseudo labels. The image is scikit-image's astronaut photo (bundled with the package).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from zsp_jax import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sam", default="")
    p.add_argument("--clip", default="")
    p.add_argument("--classes", default="person,rocket,flag,sky,helmet")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from zsp_jax.label import outputs
    from zsp_jax.label.classes import load_classes
    from zsp_jax.label.labeller import Labeller
    from zsp_jax.label.model_files import load_clip_checkpoint, load_sam_checkpoint
    from zsp_jax.label.options import LabelOptions
    from zsp_jax.references.amg import sample_images
    from zsp_jax.models.random_checkpoints import random_weight_label_config, tiny_checkpoints
    from zsp_jax.utils import io

    cache = tempfile.mkdtemp(prefix="zsp_figure_")
    random_models = not (args.sam and args.clip)
    if random_models:
        sam_path, clip_path = tiny_checkpoints(cache)
        config = random_weight_label_config()
        config.amg.points_per_side = 6
        config.amg.max_masks = 108
        config.pooling = "area"
        config.no_class = "none"
    else:
        from zsp_jax.label.options import default_label_config

        sam_path, clip_path, config = args.sam, args.clip, default_label_config()
    config.write_segments = True
    sam, _ = load_sam_checkpoint(sam_path, cache, dtype="float32")
    clip, tok = load_clip_checkpoint(clip_path, cache, dtype="float32")
    classes = load_classes(args.classes)
    result = Labeller(sam, clip, tok, LabelOptions.from_config(config, classes)).label(
        sample_images([(300, 300)]))[0]
    image = sample_images([(300, 300)])[0]
    from zsp_jax.data.pseudo_labels import segment_masks

    masks = segment_masks({"height": 300, "width": 300, "segments": result.segments})
    seg_view = image.astype(np.float32) * 0.4
    rng = np.random.default_rng(0)
    for m in sorted(masks, key=lambda m: -m.sum()):
        seg_view[m] = 0.4 * image[m] + 0.6 * rng.integers(0, 256, 3)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), dpi=100)
    titles = ["image", f"SAM segments ({len(masks)})", "pseudo label (GEM-CLIP classes)"]
    for ax, im, title in zip(axes, (image, seg_view.astype(np.uint8), outputs.colourize(result.label)), titles):
        ax.imshow(im)
        ax.set_title(title)
        ax.axis("off")
    present = [v for v in np.unique(result.label) if v != 255]
    handles = [plt.Rectangle((0, 0), 1, 1, color=outputs.PALETTE[v] / 255) for v in present]
    axes[2].legend(handles, [classes.names[v] for v in present], loc="lower right", fontsize=7)
    if random_models:
        fig.suptitle("random-weight models: the layout of the outputs, not their quality", fontsize=9)
    fig.tight_layout()
    with io.atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png")
    print(args.out)
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

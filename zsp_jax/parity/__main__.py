r"""Parity of zsp_jax with the PyTorch originals on your own weights and images.

    python -m zsp_jax.parity --sam sam_vit_h_4b8939.pth --clip ViT-B-16.pt --images photos/ --out runs/parity
    python -m zsp_jax.parity --sam weights/sam_vit_h.safetensors --sam_reference sam_vit_h_4b8939.pth \
        --clip open_clip_vit_b16.bin --clip_model_name ViT-B-16-quickgelu --deeplab exp/best.pth \
        --images a.jpg,b.jpg --dtype float32,bfloat16 --matmul_precision highest,default --out runs/parity

Loads each checkpoint in both frameworks (ours from the original file, converted as the labeller
converts it, or from a converted ``.safetensors`` with the original named by ``--*_reference``),
runs both on ``--num_images`` images and reports, per component, the worst and median relative
error or agreement against the tolerance of the parity tests (``zsp_jax/parity/tolerances.py``).
Extra ``--dtype`` / ``--matmul_precision`` values add runs of ours, compared with the float32
originals, reported without a verdict. Exit code 0: every float32 comparison within tolerance;
1: not (each failing component on a ``FAIL`` line); 2: a mistake in the inputs (one ``error:``
line each, checked before any work). Reading the report: docs/parity.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zsp_jax import cli
from zsp_jax.parity.tolerances import COMPONENTS


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m zsp_jax.parity", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", help="SAM: segment-anything .pth, or a converted .safetensors (with --sam_reference); "
                                 "default: the --config's label.sam_checkpoint")
    p.add_argument("--sam_reference", help="the original .pth, when --sam is a converted .safetensors")
    p.add_argument("--clip", help="CLIP: OpenAI .pt, open_clip file, transformers directory, or a converted "
                                  ".safetensors (with --clip_reference); default: the --config's "
                                  "label.clip_checkpoint")
    p.add_argument("--clip_reference", help="the original CLIP file, when --clip is a converted .safetensors")
    p.add_argument("--clip_model_name", default="",
                   help="open_clip model name of an open_clip file, as the labeller's label.clip_model_name "
                        "(ViT-B-16-quickgelu for OpenAI's weights, ViT-B-16 for LAION / DataComp weights)")
    p.add_argument("--clip_reference_model_name", default="",
                   help="the open_clip model the PyTorch side builds the original as (default: --clip_model_name)")
    p.add_argument("--deeplab", help="DeepLabV3+: UniMatch's best.pth, or a converted .safetensors "
                                     "(with --deeplab_reference)")
    p.add_argument("--deeplab_reference", help="the UniMatch checkpoint, when --deeplab is a converted .safetensors")
    p.add_argument("--deeplab_size", type=int, default=321, help="DeepLab input side: images resized to a square "
                                                                 "(default 321, UniMatch's PASCAL crop)")
    p.add_argument("--deeplab_geometry", default="voc", help="voc: UniMatch's PASCAL / COCO models (output stride "
                                                           "16, ASPP 6/12/18); cityscapes: output stride 8, "
                                                           "multi-grid, ASPP 12/24/36")
    p.add_argument("--images", help="a folder of images (recursive) or image files, comma-separated")
    p.add_argument("--num_images", type=int, default=4, help="images compared (the first ones, sorted)")
    p.add_argument("--classes", help="voc | coco | a,b,c | a class file (default: the label settings' classes)")
    p.add_argument("--config", help="a config file with a 'label' section (e.g. the one you label with; default: "
                                    "the labeller's defaults): AMG, GEM and class-rule settings")
    p.add_argument("--max_side", type=int, help="label.max_side: larger images are compared at this longer side")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32 (always run, judged), bfloat16")
    p.add_argument("--matmul_precision", default="highest",
                   help="comma-separated jax_default_matmul_precision values: highest (float32 parity), high, "
                        "default (TF32 / bf16 passes on GPUs and TPUs)")
    p.add_argument("--components", default=",".join(COMPONENTS), help="groups to compare (default: all)")
    p.add_argument("--out", help="output folder: parity.json, parity.md, label-map pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="library logs and tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit code (0 pass, 1 fail); raises ``cli.UsageError`` for input mistakes."""
    from zsp_jax.parity import inputs, run

    args = parser().parse_args(argv)
    cli.quiet_library_logs(args.verbose)
    setup = inputs.check(args)
    command = ["python -m zsp_jax.parity", *(sys.argv[1:] if argv is None else argv)]
    _, code = run.run(setup, command=command, progress=not args.quiet)
    return code


if __name__ == "__main__":
    cli.run_tool(main)

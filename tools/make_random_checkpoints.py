"""Writes random-weight checkpoints in the PyTorch formats users of the originals have, for trying the
pipeline without downloads (the labels and the model they give mean nothing).

    python tools/make_random_checkpoints.py --out weights/random [--seed 0]

Writes (tiny architectures, so the whole pipeline runs in minutes on a CPU):
  sam_tiny.pth              a segment-anything ``Sam`` state_dict (encoder 64 wide, 4 blocks, 256 px input)
  open_clip_tiny.bin        an open_clip ``CLIP`` state_dict (ViT with 8 px patches, 32 px, QuickGELU)
  resnet_tiny_backbone.pth  a UniMatch-style deep-stem ResNet backbone state_dict (``DeepLabConfig.tiny_resnet``)
and prints the config overrides that use them with configs/voc.py. Needs torch (and segment-anything,
which imports torchvision: the project's stand-in is installed for it).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from zsp_jax import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from zsp_jax.references import torchvision_stub

    torchvision_stub.install()
    import torch

    from zsp_jax.models.deeplab.config import DeepLabConfig
    from zsp_jax.references.checkpoints import pytorch_checkpoints
    from zsp_jax.references.torch_utils import randomize_
    from zsp_jax.references.unimatch_model import build

    sam, clip = pytorch_checkpoints(args.out, seed=args.seed)
    backbone = os.path.join(args.out, "resnet_tiny_backbone.pth")
    torch.manual_seed(args.seed)
    model = randomize_(build(DeepLabConfig.tiny_resnet(num_classes=21)), seed=args.seed)
    torch.save(model.backbone.state_dict(), backbone)
    for path in (sam, clip, backbone):
        print(f"{path}  ({os.path.getsize(path) / 1e6:.1f} MB)")
    print("use with configs/voc.py:\n"
          f"  --config.label.sam_checkpoint={sam} --config.label.sam_variant= --config.label.sam_allow_custom=True\n"
          f"  --config.label.clip_checkpoint={clip} --config.label.clip_variant= --config.label.clip_model_name="
          "ViT-B-16-quickgelu --config.label.clip_size=64 --config.label.gem_depth=3\n"
          f"  --config.model.backbone=tiny_resnet --config.model.pretrained={backbone}")
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

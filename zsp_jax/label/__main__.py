r"""Zero-shot pseudo labels from the command line.

A folder of your own images with your own classes:

    python -m zsp_jax.label --images photos/ --classes my_classes.txt --out runs/photos \
        --sam sam_vit_h_4b8939.pth --clip ViT-B-16.pt

A dataset split from a config (its ``label`` section; ``data.*`` name the dataset and split):

    python -m zsp_jax.label --config configs/voc.py:split=1464 --config.data.root=data/VOCdevkit/VOC2012 \
        --sam weights/sam_vit_h.safetensors --clip weights/clip_vit_b16.safetensors

Options: ``--classes voc|coco|a,b,c|FILE``, ``--gt DIR`` (ground truth for a folder, evaluated
with ``--eval``), ``--sweep 0.1:0.4:0.05`` (mIoU per threshold; implies segment records),
``--overwrite``, ``--retry_failed``, ``--quiet``; any ``--config.label.<field>=...``. A rerun
skips finished images; the output layout is in ``zsp_jax/label/outputs.py`` and the README.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "config file[:variant args] with a 'label' section",
                                          lock_config=True)
_IMAGES = flags.DEFINE_string("images", None, "folder of images to label (recursive)")
_CLASSES = flags.DEFINE_string("classes", None, "voc | coco | 'a,b,c' | a class file")
_OUT = flags.DEFINE_string("out", None, "output folder (default: <workdir>/pseudo_labels)")
_SAM = flags.DEFINE_string("sam", None, "SAM checkpoint: .safetensors or segment-anything .pth")
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint: .safetensors, OpenAI .pt, open_clip file or HF dir")
_CLIP_NAME = flags.DEFINE_string("clip_model_name", None, "open_clip model name (e.g. ViT-H-14) when needed")
_GT = flags.DEFINE_string("gt", None, "folder of ground-truth masks (<gt>/<image path without extension>.png)")
_EVAL = flags.DEFINE_bool("eval", None, "evaluate against ground truth (default: label.evaluate)")
_SWEEP = flags.DEFINE_string("sweep", None, "thresholds to evaluate, start:stop:step or a,b,c")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "start over in the output folder")
_RETRY = flags.DEFINE_bool("retry_failed", False, "try again images a previous run could not read")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress bars")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from zsp_jax.label import stage
    from zsp_jax.label.checkpoints import CheckpointError

    config = _CONFIG.value
    c = config.label
    with config.unlocked():
        for flag, field in ((_IMAGES, "images_dir"), (_CLASSES, "classes"), (_OUT, "out_dir"), (_SAM, "sam_checkpoint"),
                            (_CLIP, "clip_checkpoint"), (_CLIP_NAME, "clip_model_name"), (_GT, "gt_dir"),
                            (_EVAL, "evaluate"), (_SWEEP, "sweep_thresholds")):
            if flag.value is not None:
                c[field] = flag.value
        if _SWEEP.value:
            c.write_segments = True
        c.overwrite = c.overwrite or _OVERWRITE.value
        c.retry_failed = c.retry_failed or _RETRY.value
        if not c.images_dir and "data" not in config:
            raise app.UsageError("give --images DIR, or --config with a data section (a dataset split)")
        if c.images_dir and not c.out_dir and config.workdir == "runs/label":
            c.out_dir = os.path.join("runs", "label", os.path.basename(os.path.normpath(c.images_dir)))
    try:
        stage.run(config, progress=not _QUIET.value)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

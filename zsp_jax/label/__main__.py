r"""Zero-shot pseudo labels from the command line.

A folder of your own images (or one image) with your own classes:

    python -m zsp_jax.label --images photos/ --classes my_classes.txt --out runs/photos \
        --sam sam_vit_h_4b8939.pth --clip ViT-B-16.pt

A dataset split from a config (its ``label`` section; ``data.*`` name the dataset and split):

    python -m zsp_jax.label --config configs/voc.py:split=1464 --config.data.root=data/VOCdevkit/VOC2012 \
        --sam weights/sam_vit_h.safetensors --clip weights/clip_vit_b16.safetensors

Options: ``--classes voc|coco|a,b,c|FILE``, ``--gt DIR`` (ground truth for a folder, evaluated
with ``--eval``), ``--sweep 0.1:0.4:0.05`` (mIoU per threshold; implies segment records),
``--overwrite``, ``--retry_failed``, ``--quiet``, ``--verbose``; any ``--config.label.<field>=...``.
A rerun skips finished images; the output layout is in ``zsp_jax/label/outputs.py``. Every input
is checked before any work; a mistake is one ``error:`` line naming the flag and exit code 2.
"""

from __future__ import annotations

import os
import re

from absl import app, flags

from zsp_jax import cli

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")
_CONFIG = cli.define_config_flag(_DEFAULT, "config file[:variant args] with a 'label' section")
_IMAGES = flags.DEFINE_string("images", None, "folder of images to label (recursive), or one image file")
_CLASSES = flags.DEFINE_string("classes", None, "voc | coco | 'a,b,c' | a class file")
_OUT = flags.DEFINE_string("out", None, "output folder (default: <workdir>/pseudo_labels)")
_SAM = flags.DEFINE_string("sam", None, "SAM checkpoint: .safetensors or segment-anything .pth")
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint: .safetensors, OpenAI .pt, open_clip file or HF dir")
_CLIP_NAME = flags.DEFINE_string("clip_model_name", None, "open_clip model name (e.g. ViT-B-16-quickgelu) when needed")
_GT = flags.DEFINE_string("gt", None, "folder of ground-truth masks (<gt>/<image path without extension>.png)")
_EVAL = flags.DEFINE_bool("eval", None, "evaluate against ground truth (default: label.evaluate)")
_SWEEP = flags.DEFINE_string("sweep", None, "thresholds to evaluate, start:stop:step or a,b,c")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "start over in the output folder")
_RETRY = flags.DEFINE_bool("retry_failed", False, "try again images a previous run could not read")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress bars")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library logs and tracebacks on the console")

# flag -> the label field it sets (problems found in a field are reported under the flag that set it)
_FIELDS = ((_IMAGES, "images_dir"), (_CLASSES, "classes"), (_OUT, "out_dir"), (_SAM, "sam_checkpoint"),
           (_CLIP, "clip_checkpoint"), (_CLIP_NAME, "clip_model_name"), (_GT, "gt_dir"), (_EVAL, "evaluate"),
           (_SWEEP, "sweep_thresholds"))


def apply_flags(config) -> None:
    """Writes the given flags into ``config.label`` and checks how they combine."""
    c = config.label
    with config.unlocked():
        for flag, field in _FIELDS:
            if flag.value is not None:
                c[field] = flag.value
        if c.sweep_thresholds:
            c.write_segments = True
        c.overwrite = c.overwrite or _OVERWRITE.value
        c.retry_failed = c.retry_failed or _RETRY.value
        if not c.images_dir and "data" not in config:
            raise cli.UsageError("give --images DIR (or one image file), or --config with a data section (a dataset "
                                 "split)")
        if c.images_dir and not c.out_dir and config.workdir == "runs/label":
            c.out_dir = os.path.join("runs", "label", os.path.basename(os.path.normpath(c.images_dir)))
    if _EVAL.value and c.images_dir and not c.gt_dir:
        raise cli.UsageError("--eval: a folder is evaluated against ground truth: give --gt DIR too")


def in_flag_terms(problem: str) -> str:
    """A problem naming ``label.<field>`` names the flag instead when a flag set that field."""
    for flag, field in _FIELDS:
        if flag.value is None:
            continue
        pattern = rf"^(config field )?label\.{field}(=('[^']*'|\"[^\"]*\"|[^:\s]*))?(?=:|\s)"
        if re.match(pattern, problem):
            return re.sub(pattern, f"--{flag.name}={flag.value}", problem, count=1)
    return problem


def main(argv: list[str]) -> None:
    logs: dict[str, str] = {}

    def run() -> None:
        from zsp_jax import preflight, runtime
        from zsp_jax.label import labelling

        config = _CONFIG.value
        apply_flags(config)
        problems = preflight.check(config, {"label"})
        if problems:
            raise cli.UsageError("\n".join(in_flag_terms(p) for p in problems))
        logs["file"] = runtime.route_logs(labelling.out_dir_of(config), verbose=_VERBOSE.value)
        labelling.run(config, progress=not _QUIET.value)

    cli.run_main(run, verbose=lambda: _VERBOSE.value, log_file=lambda: logs.get("file"))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

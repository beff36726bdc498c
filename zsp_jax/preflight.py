"""Checks every input of a run before any heavy work, and reports every problem at once.

``check(config, stages)`` looks at what the selected stages will read — the dataset layout, the
split and validation lists, the SAM and CLIP checkpoints (their kind and variant, from metadata
or tensor shapes, nothing converted), the ImageNet backbone file, the class list and the label
settings — and returns one line per problem, each saying what to download or set and where to
put it. ``main`` stops with all of them before labelling or training starts.
"""

from __future__ import annotations

import os
from typing import Any

VOC_HELP = ("PASCAL VOC 2012 (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar) unpacked "
            "so that <root> holds JPEGImages/ and SegmentationClass/, plus UniMatch's SegmentationClassAug/ "
            "(the SBD masks, linked from github.com/LiheYoung/UniMatch) beside them; set --config.data.root")
COCO_HELP = ("COCO 2017 (train2017/, val2017/, annotations/ from https://cocodataset.org) at <root>, then "
             "'python tools/prepare_coco.py --root <root>' for masks/; set --config.data.root")
ADE20K_HELP = ("ADE20K (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) unpacked so that "
               "<root> holds images/{training,validation}/, with UniMatch V2's pre-processed annotations (classes "
               "0..149, 255 = other; linked from github.com/LiheYoung/UniMatch-V2) as annotations/"
               "{training,validation}/; set --config.data.root")
BACKBONE_HELP = ("an ImageNet backbone: UniMatch's resnet101.pth / resnet50.pth / xception.pth (linked from "
                 "github.com/LiheYoung/UniMatch, 'pretrained/'), converted on first use or with "
                 "'python tools/convert_backbone.py pretrained/resnet101.pth weights/r101.safetensors "
                 "--num-classes 21'; set --config.model.pretrained (or '' to start from random weights)")


def _data_problems(config: Any, stages: set[str]) -> list[str]:
    from zsp_jax.data import readers, splits

    d = config.data
    if config.get("synthetic"):
        return []  # generated at the start of the run
    problems = []
    help_text = {"voc": VOC_HELP, "coco": COCO_HELP, "ade20k": ADE20K_HELP}.get(d.dataset, COCO_HELP)
    root = os.path.expanduser(d.root)
    try:
        layout = readers.make_layout(d.dataset, root)
        if d.dataset == "coco" and not os.path.isdir(os.path.join(layout.root, "masks")):
            problems.append(f"data.root={d.root!r}: no masks/ folder: run 'python tools/prepare_coco.py --root {d.root}'")
    except (FileNotFoundError, ValueError) as e:
        return [f"data.root={d.root!r}: {e}. Needed: {help_text}"]
    splits_dir = os.path.expanduser(d.splits_dir)
    lab, unl = splits.split_paths(splits_dir, d.split)
    make = (f"'python tools/make_splits.py --dataset {d.dataset} --root {d.root} --out {d.splits_dir} --splits "
            f"{d.split}', or set data.splits_dir to UniMatch's splits/"
            f"{ {'voc': 'pascal'}.get(d.dataset, d.dataset)} (UniMatch V2's for ade20k)")
    needs_split = bool(stages & {"train"}) or ("label" in stages and not config.label.images_dir)
    for path in (lab, unl) if needs_split else ():
        if not os.path.isfile(path):
            problems.append(f"data.split={d.split!r}: split file {path} not found; write it with {make}")
    if stages & {"train", "eval"} and not os.path.isfile(os.path.join(splits_dir, "val.txt")):
        problems.append(f"data.splits_dir={d.splits_dir!r}: no val.txt (the validation list); write it with {make}")
    return problems


def _train_problems(config: Any, stages: set[str]) -> list[str]:
    problems = []
    m = config.model
    if m.get("pretrained") and m.get("family", "deeplab") == "unimatch_v2":
        from zsp_jax.train import v2_state

        try:
            problem = v2_state.pretrained_problem_v2(m.pretrained, v2_state.model_config_v2(config))
        except ValueError as e:  # a bad model.encoder: named by the config check
            problem = str(e)
        if problem:
            problems.append(f"model.pretrained={m.pretrained!r}: {problem}; {v2_state.PRETRAINED_HELP}")
    elif m.get("pretrained"):
        path = os.path.expanduser(m.pretrained)
        if not os.path.isfile(path):
            problems.append(f"model.pretrained={m.pretrained!r}: no such file; {BACKBONE_HELP}")
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="numpy") as f:
                    kind = (f.metadata() or {}).get("zsp_jax.model")
            except Exception as e:  # noqa: BLE001
                kind = f"unreadable ({e})"
            if kind != "deeplabv3plus":
                problems.append(f"model.pretrained={m.pretrained!r}: not a converted DeepLab / backbone file "
                                f"(model {kind!r}); {BACKBONE_HELP}")
        else:
            try:
                from zsp_jax.models.deeplab.convert import detect_source
                from zsp_jax.utils.weights import load_torch_checkpoint, unwrap_state_dict

                detect_source(unwrap_state_dict(load_torch_checkpoint(path), path=path), source_name=path)
            except Exception as e:  # noqa: BLE001 - unreadable, foreign, or torch missing
                problems.append(f"model.pretrained={m.pretrained!r}: {e}; {BACKBONE_HELP}")
    t = config.train
    pseudo = config.data.get("pseudo_labels", "")
    if t.mode == "zsp" and "label" not in stages and not config.get("synthetic"):
        if not pseudo or not os.path.isdir(os.path.expanduser(pseudo)):
            problems.append(f"data.pseudo_labels={pseudo!r}: mode zsp trains on pseudo labels, and the label stage "
                            "is not selected: run it (--config.stages=label,train,eval) or point data.pseudo_labels "
                            "at a labeller's labels/ folder")
    return problems


def check(config: Any, stages: set[str]) -> list[str]:
    """Every problem with the inputs of ``stages`` (empty when the run can start)."""
    problems = []
    if stages & {"label", "train", "eval"} and ("data" in config):
        if not ("label" in stages and config.label.images_dir and not stages & {"train", "eval"}):
            problems += _data_problems(config, stages)
    if "label" in stages:
        from zsp_jax.label import labelling

        problems += labelling.input_problems(config)
    if stages & {"train", "eval"} and "train" in config:
        from zsp_jax.train import config as train_config

        try:  # the trainer's field values, before hours of labelling
            (train_config.validate if "train" in stages else train_config.validate_for_eval)(config)
        except ValueError as e:
            problems.append(str(e))
    if "train" in stages:
        problems += _train_problems(config, stages)
    return problems


class InputProblems(ValueError):
    """The inputs a run needs are missing or wrong; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) with the run's inputs:\n  - " + "\n  - ".join(problems))

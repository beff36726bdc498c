"""Evaluation against a literal re-statement of UniMatch's ``evaluate`` (``zsp_jax.references.unimatch_step``) on a
randomised tiny model: the three modes with exact shapes (``eval.bucket = 0``) give the reference's predictions
and IoUs, sharded over 8 devices; bucketed canvases compile fewer programs; ``python -m zsp_jax.evaluate``
reads a UniMatch training checkpoint (``.pth``) and a converted ``.safetensors`` and reports the reference's
mIoU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from zsp_jax import metrics
from zsp_jax.data import augment, decode, readers, sources, splits, synthetic
from zsp_jax.models.deeplab import DeepLabConfig
from zsp_jax.models.deeplab import convert as deeplab_convert
from zsp_jax.references import unimatch_step
from zsp_jax.references.deeplab import ours_from_torch, torch_reference
from zsp_jax.train import evaluation
from zsp_jax.train import state as state_lib

from .conftest import REPO, smoke_config

NUM_CLASSES = 21
CONFIG = DeepLabConfig.tiny_resnet(num_classes=NUM_CLASSES)


SIZES = ((44, 70), (100, 90))  # (H, W): smaller than the crops below in one or both axes, and larger


def write_voc(root: str, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """A VOC-layout dataset whose val images have exactly ``sizes`` (train: 4 images of 64 x 64)."""
    rng = np.random.default_rng(seed)
    ids = {"train": [(f"2000_{i:06d}", (64, 64)) for i in range(4)],
           "val": [(f"2001_{i:06d}", hw) for i, hw in enumerate(sizes)]}
    for part, items in ids.items():
        for name, (h, w) in items:
            image, mask = synthetic.make_image(rng, h, w, NUM_CLASSES)
            for sub, data in (("JPEGImages/" + name + ".jpg", decode.encode_jpeg(image, 90)),
                              ("SegmentationClass/" + name + ".png", decode.encode_png(mask, synthetic.voc_palette())),
                              ("SegmentationClassAug/" + name + ".png", decode.encode_png(mask))):
                os.makedirs(os.path.dirname(os.path.join(root, sub)), exist_ok=True)
                with open(os.path.join(root, sub), "wb") as f:
                    f.write(data)
        os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
        with open(os.path.join(root, "ImageSets", "Segmentation", part + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n, _ in items))


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """6 validation images of two sizes (two compiled programs per mode at exact sizes)."""
    root = str(tmp_path_factory.mktemp("eval") / "VOC2012")
    write_voc(root, [SIZES[i % 2] for i in range(6)])
    examples = readers.VocLayout(root).subset("val")
    return root, examples, [decode.image_size(e.image) for e in examples]


@pytest.fixture(scope="module")
def models(val_set):
    """A randomised reference, its classifier re-drawn on standardised decoder features (a random head on
    ReLU features predicts one or two classes everywhere), and the same weights in our model: the argmax
    then varies from pixel to pixel over many classes."""
    _, examples, _ = val_set
    torch.manual_seed(0)
    ref = torch_reference(CONFIG, seed=3)
    feats = []
    hook = ref.fuse.register_forward_hook(lambda module, args, out: feats.append(out.permute(0, 2, 3, 1).flatten(0, 2)))
    with torch.no_grad():
        for x, _ in _torch_loader(examples):
            ref(x)
        hook.remove()
        f = torch.cat(feats)
        mean, std = f.mean(0), f.std(0).clamp_min(1e-3)
        w = torch.randn(NUM_CLASSES, f.shape[1], generator=torch.Generator().manual_seed(0)) / std
        ref.classifier.weight.copy_(w[:, :, None, None])
        ref.classifier.bias.copy_(-(w * mean).sum(1))
    graphdef, params, stats = state_lib.split_model(state_lib.strip_rng_streams(ours_from_torch(CONFIG, ref)))
    return ref, graphdef, params, stats


def _torch_loader(examples):
    for e in examples:
        image, mask = decode.decode_pair(*e.read_bytes(), e.name, e.mask)
        x = torch.from_numpy(augment.normalize(image)).permute(2, 0, 1)[None].contiguous()
        yield x, torch.from_numpy(mask.astype(np.int64))[None]


def _placement():
    mesh = state_lib.make_mesh()
    assert mesh.size == 8  # sharded over the simulated devices
    return state_lib.Placement(mesh, None, state_lib.batch_sharding(mesh))


@pytest.mark.parametrize("mode, crop", [("original", 48), ("center_crop", 80), ("sliding_window", 48)])
def test_exact_modes_match_unimatch_evaluate(models, val_set, mode, crop):
    """Exact shapes (bucket 0): the confusion matrix of the reference's predictions (centre crops with Python's
    odd slices of small images, sliding windows clipped at the edges) and its IoUs."""
    ref, graphdef, params, stats = models
    root, examples, sizes = val_set
    cm_ref = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)

    def record(pred, mask):
        cm_ref[:] += metrics.confusion_matrix(pred, mask, NUM_CLASSES)

    miou_ref, iou_ref = unimatch_step.evaluate(ref, _torch_loader(examples), mode, crop, NUM_CLASSES, record)
    placement = _placement()
    ev = evaluation.Evaluator(graphdef, sources.FileSource(examples), sizes, placement, mode=mode, crop=crop, bucket=0,
                              batch_size=8, num_classes=NUM_CLASSES)
    assert len(ev.canvases) == 2
    params_d, stats_d = state_lib.place((params, stats), state_lib.state_shardings((params, stats), placement.mesh))
    cm = ev.confusion(params_d, stats_d, progress=False)
    ours = metrics.summarize(cm)
    # Argmax near-ties may flip a pixel between the two float programs: at most 0.1% of the pixels.
    assert cm.sum() == cm_ref.sum() and np.abs(cm - cm_ref).sum() <= 2e-3 * cm.sum(), np.abs(cm - cm_ref).sum()
    iou_ours = np.array([v or 0.0 for v in ours["per_class"].values()])
    assert np.abs(iou_ours - iou_ref).max() < 0.5 and abs(ours["miou"] - miou_ref) < 0.1, (ours["miou"], miou_ref)
    # The comparison has something to compare: many classes predicted, several of them right somewhere.
    predicted = cm[:, :NUM_CLASSES].sum(axis=0)
    assert (predicted > 0.01 * predicted.sum()).sum() >= 5 and (iou_ref > 0).sum() >= 2


def test_bucketed_canvases_plan(val_set):
    _, examples, sizes = val_set
    sizes = sizes + [(61, 33), (128, 128)]
    for mode, crop in (("original", 48), ("center_crop", 80), ("sliding_window", 48)):
        plan = evaluation.plan_batches(sizes, mode=mode, crop=crop, bucket=64, global_batch=4)
        canvases = {b.canvas for b in plan}
        assert all(h % 64 == 0 and w % 64 == 0 for h, w in canvases) or mode == "center_crop"
        for b in plan:
            for i in b.indices:
                if i >= 0:  # the image (its crop, its windows at full size) fits its canvas
                    h, w = sizes[i]
                    need = (crop, crop) if mode == "center_crop" else (h, w)
                    if mode == "sliding_window":
                        need = (evaluation.window_starts(h, crop)[-1] + crop, evaluation.window_starts(w, crop)[-1] + crop)
                    assert b.canvas[0] >= need[0] and b.canvas[1] >= need[1], (mode, sizes[i], b.canvas)
        # every image once, in batches of 4 padded with -1
        assert sorted(i for b in plan for i in b.indices if i >= 0) == list(range(len(sizes)))
        assert all(len(b.indices) == 4 for b in plan)
    assert evaluation.center_crop_box(44, 70, 80) == (26, 44, 65, 70)  # Python's slicing of img[-18:62, -5:75]


def test_evaluate_command_reads_unimatch_pth_and_converted_safetensors(models, val_set, tmp_path):
    """A UniMatch training checkpoint (``{'model': module.* state_dict, 'optimizer', 'epoch', 'previous_best'}``)
    and its converted ``.safetensors`` evaluate to the reference's mIoU."""
    ref, _, _, _ = models
    root, examples, _ = val_set
    miou_ref, _ = unimatch_step.evaluate(ref, _torch_loader(examples), "original", 48, NUM_CLASSES)
    pth = str(tmp_path / "best.pth")
    torch.save({"model": {"module." + k: v for k, v in ref.state_dict().items()}, "optimizer": {}, "epoch": 3,
                "previous_best": 1.0}, pth)
    splits_dir = str(tmp_path / "splits")
    splits.make_splits(readers.VocLayout(root), splits_dir, ["2"], seed=0)  # (the config needs a split)
    work = str(tmp_path / "work")
    overrides = [f"--config.workdir={work}", f"--config.data.root={root}", f"--config.data.splits_dir={splits_dir}",
                 "--config.data.split=2", "--config.eval.bucket=0"]
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "zsp_jax.evaluate", "--config",
                        os.path.join(REPO, "configs", "smoke.py") + ":source=folder,workers=0", f"--checkpoint={pth}",
                        *overrides], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.load(open(os.path.join(work, "eval_original.json")))
    assert abs(result["miou"] - miou_ref) < 0.1, (result["miou"], miou_ref)
    assert "mIoU" in r.stdout and "best.pth" in result["checkpoint"]

    from zsp_jax.train import checkpoint_eval

    weights, config, info = deeplab_convert.convert_file(pth)
    converted = str(tmp_path / "best.safetensors")
    deeplab_convert.save_converted(converted, weights, config, info)
    c = smoke_config(work, root, splits_dir, split="2")
    c.eval.bucket = 0
    result = checkpoint_eval.evaluate(c, converted)
    assert abs(result["miou"] - miou_ref) < 0.1

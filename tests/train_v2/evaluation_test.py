"""UniMatch V2's evaluation against a literal re-statement of V2's ``evaluate`` (``supervised.py`` at f6afb4df, with
``multiplier=14``, below) on a randomised tiny DINOv2 + DPT: ``original`` (each image resized to multiples of 14 and
the logits back, bilinear with aligned corners) and ``sliding_window`` (V2's windows, the last one ending at the
image's edge) give the reference's predictions on bucketed canvases sharded over 8 devices; and
``python -m zsp_jax.evaluate`` reads a UniMatch V2 ``best.pth`` (its EMA teacher by default, the student with
``eval.weights=student``) and the converted ``.safetensors``, and reports the reference's mIoU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.dpt.helpers import dinov2_pair, v2_state_dict
from tests.train.conftest import REPO, smoke_config
from tests.train.evaluation_test import write_voc
from zsp_jax import metrics
from zsp_jax.data import augment, decode, readers, sources, splits
from zsp_jax.models.dpt import DptConfig
from zsp_jax.models.dpt import convert as dpt_convert
from zsp_jax.references.unimatch_step import intersection_and_union
from zsp_jax.train import evaluation
from zsp_jax.train import state as state_lib

NUM_CLASSES = 21
CONFIG = DptConfig.tiny(num_classes=NUM_CLASSES)  # the model of configs/smoke.py:family=v2
CROP = 42
# (H, W): resized by V2 to (56, 70) and (84, 84); both sides at least the crop, as V2's sliding windows need
SIZES = ((60, 75), (90, 88))


def v2_evaluate(model: torch.nn.Module, loader, mode: str, crop: int, num_classes: int, record=None):
    """UniMatch V2's ``evaluate(model, loader, mode, cfg, multiplier=14)``, re-stated (batch 1, CPU; the sliding
    window's buffer has ``num_classes`` channels where V2 writes Cityscapes' 19). Returns (mIoU %, IoU % per class)."""
    inter_sum, union_sum = np.zeros(num_classes), np.zeros(num_classes)
    with torch.no_grad():
        for img, mask in loader:
            if mode == "sliding_window":
                grid = crop
                b, _, h, w = img.shape
                final = torch.zeros(b, num_classes, h, w)
                row = 0
                while row < h:
                    col = 0
                    while col < w:
                        pred = model(img[:, :, row: row + grid, col: col + grid])
                        final[:, :, row: row + grid, col: col + grid] += pred.softmax(dim=1)
                        if col == w - grid:
                            break
                        col = min(col + int(grid * 2 / 3), w - grid)
                    if row == h - grid:
                        break
                    row = min(row + int(grid * 2 / 3), h - grid)
                pred = final
            else:
                ori_h, ori_w = img.shape[-2:]
                new_h, new_w = int(ori_h / 14 + 0.5) * 14, int(ori_w / 14 + 0.5) * 14
                img = F.interpolate(img, (new_h, new_w), mode="bilinear", align_corners=True)
                pred = model(img)
                pred = F.interpolate(pred, (ori_h, ori_w), mode="bilinear", align_corners=True)
            pred = pred.argmax(dim=1)
            if record is not None:
                record(pred.numpy(), mask.numpy())
            inter, union, _ = intersection_and_union(pred.numpy(), mask.numpy(), num_classes, 255)
            inter_sum += inter
            union_sum += union
    iou = inter_sum / (union_sum + 1e-10) * 100.0
    return float(np.mean(iou)), iou


def _loader(examples):
    for e in examples:
        image, mask = decode.decode_pair(*e.read_bytes(), e.name, e.mask)
        yield (torch.from_numpy(augment.normalize(image)).permute(2, 0, 1)[None].contiguous(),
               torch.from_numpy(mask.astype(np.int64))[None])


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_v2") / "VOC2012")
    write_voc(root, [SIZES[i % 2] for i in range(4)])
    examples = readers.VocLayout(root).subset("val")
    return root, examples, [decode.image_size(e.image) for e in examples]


def _spread_classifier(ref: torch.nn.Module, examples, seed: int) -> None:
    """Re-draws the last 1x1 conv on standardised head features: a random head's argmax is one or two classes
    everywhere, which would make the comparison say little."""
    feats = []
    hook = ref.head.scratch.output_conv[1].register_forward_hook(
        lambda module, args, out: feats.append(out.permute(0, 2, 3, 1).flatten(0, 2)))
    with torch.no_grad():
        for x, _ in _loader(examples):
            ref(F.interpolate(x, (56, 70), mode="bilinear", align_corners=True))
        hook.remove()
        f = torch.cat(feats)
        mean, std = f.mean(0), f.std(0).clamp_min(1e-4)
        w = torch.randn(NUM_CLASSES, f.shape[1], generator=torch.Generator().manual_seed(seed)) / std
        ref.head.scratch.output_conv[2].weight.copy_(w[:, :, None, None])
        ref.head.scratch.output_conv[2].bias.copy_(-(w * mean).sum(1))


@pytest.fixture(scope="module")
def models(val_set):
    """(student, EMA teacher): two randomised references with spread classifiers, and their V2 state_dicts."""
    _, examples, _ = val_set
    out = []
    for seed in (0, 5):
        ref, _ = dinov2_pair(CONFIG, seed)
        _spread_classifier(ref, examples, seed)
        out.append((ref, v2_state_dict(ref)))
    return out


def _placement():
    mesh = state_lib.make_mesh()
    assert mesh.size == 8
    return state_lib.Placement(mesh, None, state_lib.batch_sharding(mesh))


@pytest.mark.parametrize("mode", ["original", "sliding_window"])
def test_modes_match_v2_evaluate_on_bucketed_canvases(models, val_set, mode):
    (ref, sd), _ = models
    _, examples, sizes = val_set
    cm_ref = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)

    def record(pred, mask):
        cm_ref[:] += metrics.confusion_matrix(pred, mask, NUM_CLASSES)

    miou_ref, iou_ref = v2_evaluate(ref, _loader(examples), mode, CROP, NUM_CLASSES, record)
    converted = dpt_convert.convert_segmenter_state_dict(sd, CONFIG, source_name="reference")
    graphdef, params, stats = state_lib.split_model(converted.build())
    placement = _placement()
    # one canvas (128 x 128) for both sizes; V2's original mode: one program per resized size
    ev = evaluation.Evaluator(graphdef, sources.FileSource(examples), sizes, placement, mode=mode, crop=CROP,
                              bucket=128, batch_size=8, num_classes=NUM_CLASSES, family="unimatch_v2")
    assert ev.canvases == [(128, 128)] and ev.programs == (2 if mode == "original" else 1)
    params_d = state_lib.place(params, state_lib.state_shardings(params, placement.mesh))
    cm = ev.confusion(params_d, stats, progress=False)
    ours = metrics.summarize(cm)
    # Argmax near-ties may flip a pixel between the two float programs: at most 0.2% of the pixels.
    assert cm.sum() == cm_ref.sum() and np.abs(cm - cm_ref).sum() <= 4e-3 * cm.sum(), np.abs(cm - cm_ref).sum()
    iou_ours = np.array([v or 0.0 for v in ours["per_class"].values()])
    assert np.abs(iou_ours - iou_ref).max() < 0.5 and abs(ours["miou"] - miou_ref) < 0.1, (ours["miou"], miou_ref)
    predicted = cm[:, :NUM_CLASSES].sum(axis=0)  # the comparison has something to compare
    assert (predicted > 0.01 * predicted.sum()).sum() >= 5 and (iou_ref > 0).sum() >= 2


def test_plan_and_window_origins():
    # V2's resize rounds to the nearest multiple of 14; its windows end at the image's edge
    assert evaluation.v2_input_size(60, 75) == (56, 70) and evaluation.v2_input_size(90, 88) == (84, 84)
    assert evaluation.v2_input_size(3, 700) == (14, 700)
    assert evaluation.v2_window_starts(1024, 798) == [0, 226]
    assert evaluation.v2_window_starts(2048, 798) == [0, 532, 1064, 1250]
    assert evaluation.v2_window_starts(798, 798) == [0] and evaluation.v2_window_starts(500, 798) == [0]
    sizes = [(60, 75), (90, 88), (61, 76), (30, 200)]
    plan = evaluation.plan_batches(sizes, mode="original", crop=CROP, bucket=64, global_batch=2, family="unimatch_v2")
    shapes = {i: (b.canvas, b.model_shape) for b in plan for i in b.indices if i >= 0}
    assert shapes[0] == shapes[2] == ((64, 128), (56, 70)) and shapes[1] == ((128, 128), (84, 84))
    assert shapes[3] == ((64, 256), (28, 196))
    plan = evaluation.plan_batches(sizes, mode="sliding_window", crop=CROP, bucket=64, global_batch=2,
                                   family="unimatch_v2")
    assert {b.canvas for b in plan} == {(64, 128), (128, 128), (64, 256)}  # at least the crop on each side
    # the resize matrices: rows that sum to 1 inside the image, zeros on the padding
    rows_in, cols_in, rows_out, cols_out = evaluation.v2_resize_matrices((60, 75), (64, 128), (56, 70))
    np.testing.assert_allclose(rows_in.sum(1), 1, atol=1e-6)
    assert not rows_in[:, 60:].any() and not cols_in[:, 75:].any() and not rows_out[60:].any()
    np.testing.assert_allclose(rows_out[:60].sum(1), 1, atol=1e-6)


def test_evaluate_command_reads_a_v2_pth_and_its_converted_safetensors(models, val_set, tmp_path):
    """A UniMatch V2 ``best.pth`` (``model`` and ``model_ema`` with DDP's ``module.`` keys, the optimizer, the bests):
    its EMA teacher by default, its student with ``eval.weights=student``; the converted EMA as a ``.safetensors``.
    ``model.pretrained`` names a file that is not there: evaluating a checkpoint does not read it."""
    (student, sd_student), (teacher, sd_teacher) = models
    root, examples, _ = val_set
    miou_student, _ = v2_evaluate(student, _loader(examples), "original", CROP, NUM_CLASSES)
    miou_teacher, _ = v2_evaluate(teacher, _loader(examples), "original", CROP, NUM_CLASSES)
    assert abs(miou_student - miou_teacher) > 1.0  # the two entries are told apart
    pth = str(tmp_path / "best.pth")
    torch.save({"model": {"module." + k: v for k, v in sd_student.items()},
                "model_ema": {"module." + k: v for k, v in sd_teacher.items()}, "optimizer": {}, "epoch": 3,
                "previous_best": np.float64(1.0), "previous_best_ema": np.float64(2.0), "best_epoch": 2,
                "best_epoch_ema": 3}, pth)
    splits_dir = str(tmp_path / "splits")
    splits.make_splits(readers.VocLayout(root), splits_dir, ["2"], seed=0)  # (the config needs a split)
    work = str(tmp_path / "work")
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "zsp_jax.evaluate", "--config",
                        os.path.join(REPO, "configs", "smoke.py") + ":family=v2,source=folder,workers=0",
                        f"--checkpoint={pth}", f"--config.workdir={work}", f"--config.data.root={root}",
                        f"--config.data.splits_dir={splits_dir}", "--config.data.split=2",
                        # the checkpoint holds every weight: the encoder's pretrained file is not needed on disk
                        f"--config.model.pretrained={tmp_path / 'absent' / 'dinov2_vits14_pretrain.pth'}"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.load(open(os.path.join(work, "eval_original.json")))
    assert result["weights"] == "ema" and "model_ema" in result["checkpoint"] and "mIoU" in r.stdout
    assert abs(result["miou"] - miou_teacher) < 0.1, (result["miou"], miou_teacher)

    from zsp_jax.train import checkpoint_eval

    c = smoke_config(work, root, splits_dir, split="2", arg="family=v2,source=folder,workers=0")
    c.eval.weights = "student"
    result = checkpoint_eval.evaluate(c, pth)
    assert result["weights"] == "student" and abs(result["miou"] - miou_student) < 0.1, (result["miou"], miou_student)
    converted = str(tmp_path / "best_ema.safetensors")
    dpt_convert.save_converted(converted, dpt_convert.convert_checkpoint(pth, CONFIG))  # model_ema by default
    result = checkpoint_eval.evaluate(c, converted)
    assert abs(result["miou"] - miou_teacher) < 0.1
    c.model.encoder = "s"  # a file of another model is refused, naming the fields
    with pytest.raises(ValueError, match="model.encoder"):
        checkpoint_eval.load_v2_file(c, converted, "ema")

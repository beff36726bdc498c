"""UniMatch's training step and optimiser in PyTorch, for the step parity test and ``tools/bench_train.py``.

No installable UniMatch package exists, so this is a literal re-statement, written for this
project, of the published algorithm of ``unimatch.py`` (LiheYoung/UniMatch, read, not copied):
the eval-mode forward of the mix batch under ``no_grad``, CutMix of the strong images in place,
the train-mode forward of ``cat(x, u_w)`` with the feature perturbation, the train-mode forward
of ``cat(u_s1, u_s2)``, the CutMixed targets / confidences / ignore masks, the losses with the
reference's normaliser, ``loss.backward()``, ``optimizer.step()`` and then the poly learning
rate for the next iteration. ``mode="zsp"`` swaps the weak-view targets for given zero-shot
labels with ``CrossEntropyLoss(label_smoothing=eps, ignore_index=255)`` (the paper's loss) and
skips the eval-mode forward, whose prediction it does not use (as ours does).

The model is ``zsp_jax.references.unimatch_model.DeepLabV3Plus``; its ``fp_masks`` argument
replaces ``Dropout2d(0.5)`` so that both sides drop the same channels. Tensors are NCHW.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def make_optimizer(model: nn.Module, lr: float, lr_multi: float, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    """UniMatch's SGD: the backbone at ``lr``, everything else at ``lr * lr_multi``."""
    head = [p for n, p in model.named_parameters() if "backbone" not in n]
    return torch.optim.SGD([{"params": model.backbone.parameters(), "lr": lr}, {"params": head, "lr": lr * lr_multi}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_poly_lr(optimizer: torch.optim.SGD, base_lr: float, lr_multi: float, iters: int, total_iters: int,
                power: float = 0.9) -> None:
    """What the reference does after the step of iteration ``iters`` (for the next one)."""
    lr = base_lr * (1 - iters / total_iters) ** power
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * lr_multi


def step(model: nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, Any], *,
         fp_masks: tuple[torch.Tensor, torch.Tensor], conf_thresh: float = 0.95, mode: str = "unimatch",
         label_smoothing: float = 0.1, weights: tuple[float, float, float] = (0.25, 0.25, 0.5),
         gpus: int = 1, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """One UniMatch (or zsp) iteration; returns the loss terms (tensors) and the mask ratio.

    ``batch``: ``img_x`` (B, 3, S, S), ``mask_x`` (B, S, S) long; ``img_u_w``, ``img_u_s1``,
    ``img_u_s2`` and the ``*_mix`` versions; ``ignore_mask``, ``ignore_mask_mix`` (B, S, S) long
    (255 = padding); ``cutmix_box1``, ``cutmix_box2`` (B, S, S) 0/1; for ``mode="zsp"``
    ``label_u`` and ``label_u_mix`` (B, S, S) long (255 = ignore). With ``optimizer`` None no
    update is made (the gradients stay in ``.grad``). ``gpus``: the losses of a run on that many GPUs
    (each takes an equal share of every batch; the step's ``loss_groups``). ``timings``, if given, receives the seconds of
    ``forward`` (everything up to the loss), ``backward`` and ``optimizer`` (benchmarks).
    """
    t0 = time.perf_counter()
    img_x, mask_x = batch["img_x"], batch["mask_x"]
    img_u_w, img_u_s1, img_u_s2 = batch["img_u_w"], batch["img_u_s1"].clone(), batch["img_u_s2"].clone()
    img_u_w_mix, img_u_s1_mix, img_u_s2_mix = batch["img_u_w_mix"], batch["img_u_s1_mix"], batch["img_u_s2_mix"]
    ignore_mask, ignore_mask_mix = batch["ignore_mask"], batch["ignore_mask_mix"]
    cutmix_box1, cutmix_box2 = batch["cutmix_box1"], batch["cutmix_box2"]
    criterion_l = nn.CrossEntropyLoss(ignore_index=255)

    if mode == "zsp":  # the targets are given: the partners' prediction is not needed
        conf_u_w_mix = torch.zeros(img_u_w_mix.shape[:1] + img_u_w_mix.shape[2:], dtype=img_u_w_mix.dtype)
    else:
        with torch.no_grad():
            model.eval()
            pred_u_w_mix = model(img_u_w_mix).detach()
            conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
            mask_u_w_mix = pred_u_w_mix.argmax(dim=1)

    img_u_s1[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1] = \
        img_u_s1_mix[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1]
    img_u_s2[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1] = \
        img_u_s2_mix[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1]

    model.train()
    num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
    preds, preds_fp = model(torch.cat((img_x, img_u_w)), True, fp_masks)
    pred_x, pred_u_w = preds.split([num_lb, num_ulb])
    pred_u_w_fp = preds_fp[num_lb:]
    pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2))).chunk(2)

    pred_u_w = pred_u_w.detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    if mode == "zsp":
        mask_u_w, mask_u_w_mix = batch["label_u"], batch["label_u_mix"]

    mask_u_w_cutmixed1, conf_u_w_cutmixed1, ignore_mask_cutmixed1 = mask_u_w.clone(), conf_u_w.clone(), \
        ignore_mask.clone()
    mask_u_w_cutmixed2, conf_u_w_cutmixed2, ignore_mask_cutmixed2 = mask_u_w.clone(), conf_u_w.clone(), \
        ignore_mask.clone()
    mask_u_w_cutmixed1[cutmix_box1 == 1] = mask_u_w_mix[cutmix_box1 == 1]
    conf_u_w_cutmixed1[cutmix_box1 == 1] = conf_u_w_mix[cutmix_box1 == 1]
    ignore_mask_cutmixed1[cutmix_box1 == 1] = ignore_mask_mix[cutmix_box1 == 1]
    mask_u_w_cutmixed2[cutmix_box2 == 1] = mask_u_w_mix[cutmix_box2 == 1]
    conf_u_w_cutmixed2[cutmix_box2 == 1] = conf_u_w_mix[cutmix_box2 == 1]
    ignore_mask_cutmixed2[cutmix_box2 == 1] = ignore_mask_mix[cutmix_box2 == 1]

    def gpu_loss(g: int) -> tuple[torch.Tensor, ...]:
        """The losses as GPU ``g`` of ``gpus`` computes them from its own share of the batch (SyncBN made
        the forward global; each GPU normalises by its own pixel counts; DDP averages the gradients)."""
        part = lambda t: t.chunk(gpus)[g]  # noqa: E731
        loss_x = criterion_l(part(pred_x), part(mask_x))
        if mode == "zsp":
            criterion_u = nn.CrossEntropyLoss(reduction="none", ignore_index=255, label_smoothing=label_smoothing)
            keep1 = (part(mask_u_w_cutmixed1) != 255) & (part(ignore_mask_cutmixed1) != 255)
            keep2 = (part(mask_u_w_cutmixed2) != 255) & (part(ignore_mask_cutmixed2) != 255)
            keep_w = (part(mask_u_w) != 255) & (part(ignore_mask) != 255)
        else:
            criterion_u = nn.CrossEntropyLoss(reduction="none")
            keep1 = (part(conf_u_w_cutmixed1) >= conf_thresh) & (part(ignore_mask_cutmixed1) != 255)
            keep2 = (part(conf_u_w_cutmixed2) >= conf_thresh) & (part(ignore_mask_cutmixed2) != 255)
            keep_w = (part(conf_u_w) >= conf_thresh) & (part(ignore_mask) != 255)

        loss_u_s1 = criterion_u(part(pred_u_s1), part(mask_u_w_cutmixed1))
        loss_u_s1 = (loss_u_s1 * keep1).sum() / (part(ignore_mask_cutmixed1) != 255).sum().item()
        loss_u_s2 = criterion_u(part(pred_u_s2), part(mask_u_w_cutmixed2))
        loss_u_s2 = (loss_u_s2 * keep2).sum() / (part(ignore_mask_cutmixed2) != 255).sum().item()
        loss_u_w_fp = criterion_u(part(pred_u_w_fp), part(mask_u_w))
        loss_u_w_fp = (loss_u_w_fp * keep_w).sum() / (part(ignore_mask) != 255).sum().item()
        w1, w2, wfp = weights
        loss = (loss_x + loss_u_s1 * w1 + loss_u_s2 * w2 + loss_u_w_fp * wfp) / 2.0
        return loss, loss_x, loss_u_s1, loss_u_s2, loss_u_w_fp

    per_gpu = [gpu_loss(g) for g in range(gpus)]
    loss, loss_x, loss_u_s1, loss_u_s2, loss_u_w_fp = (sum(terms) / gpus for terms in zip(*per_gpu))
    if mode == "zsp":
        keep_w = (mask_u_w != 255) & (ignore_mask != 255)
    else:
        keep_w = (conf_u_w >= conf_thresh) & (ignore_mask != 255)

    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if optimizer is not None:
        optimizer.step()
    if timings is not None:
        timings.update(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)
    mask_ratio = keep_w.sum().item() / (ignore_mask != 255).sum().item()
    return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_s1": loss_u_s1.detach(),
            "loss_s2": loss_u_s2.detach(), "loss_fp": loss_u_w_fp.detach(), "mask_ratio": mask_ratio}


# ------------------------------------------------------------------------------------------- evaluation
# UniMatch's ``supervised.py: evaluate`` and ``util/utils.py: intersectionAndUnion``, re-stated on one
# process (the reference all-reduces the per-image counts over GPUs: a sum, as here). The reference's
# sliding window accumulates into a 19-channel tensor (Cityscapes); here the model's class count.


def intersection_and_union(output: Any, target: Any, num_classes: int, ignore_index: int = 255) -> tuple[Any, ...]:
    """Per-class (intersection, union, target) pixel counts of one prediction (numpy arrays of one shape)."""
    import numpy as np

    output = output.reshape(output.size).copy()
    target = target.reshape(target.size)
    output[np.where(target == ignore_index)[0]] = ignore_index
    intersection = output[np.where(output == target)[0]]
    area_intersection, _ = np.histogram(intersection, bins=np.arange(num_classes + 1))
    area_output, _ = np.histogram(output, bins=np.arange(num_classes + 1))
    area_target, _ = np.histogram(target, bins=np.arange(num_classes + 1))
    return area_intersection, area_output + area_target - area_intersection, area_target


def evaluate(model: nn.Module, loader: Any, mode: str, crop_size: int, num_classes: int,
             on_prediction: Any = None) -> tuple[float, Any]:
    """(mIoU %, per-class IoU %) of ``model`` over ``loader``'s ``(img (1, 3, H, W) float, mask (1, H, W) long)``
    pairs, in ``mode`` ``original`` / ``center_crop`` / ``sliding_window``, as UniMatch evaluates.
    ``on_prediction(pred, mask)`` (numpy, optional) sees each image's prediction and target (tests)."""
    import numpy as np

    model.eval()
    inter_sum, union_sum = np.zeros(num_classes), np.zeros(num_classes)
    with torch.no_grad():
        for img, mask in loader:
            if mode == "sliding_window":
                grid = crop_size
                b, _, h, w = img.shape
                final = torch.zeros(b, num_classes, h, w, dtype=img.dtype)
                row = 0
                while row < h:
                    col = 0
                    while col < w:
                        pred = model(img[:, :, row: min(h, row + grid), col: min(w, col + grid)])
                        final[:, :, row: min(h, row + grid), col: min(w, col + grid)] += pred.softmax(dim=1)
                        col += int(grid * 2 / 3)
                    row += int(grid * 2 / 3)
                pred = final.argmax(dim=1)
            else:
                if mode == "center_crop":
                    h, w = img.shape[-2:]
                    start_h, start_w = (h - crop_size) // 2, (w - crop_size) // 2
                    img = img[:, :, start_h:start_h + crop_size, start_w:start_w + crop_size]
                    mask = mask[:, start_h:start_h + crop_size, start_w:start_w + crop_size]
                pred = model(img).argmax(dim=1)
            if on_prediction is not None:
                on_prediction(pred.numpy(), mask.numpy())
            inter, union, _ = intersection_and_union(pred.numpy(), mask.numpy(), num_classes, 255)
            inter_sum += inter
            union_sum += union
    iou_class = inter_sum / (union_sum + 1e-10) * 100.0
    return float(np.mean(iou_class)), iou_class


# ------------------------------------------------------------------------ one batch, both sides


def random_batch(batch: int, size: int, num_classes: int, *, seed: int = 0) -> dict[str, Any]:
    """A batch in the reference's naming as numpy (NHWC images, already normalised): random images
    and labels, a band of ignored labels, padding in some images, UniMatch-sized CutMix boxes in half
    of them (``step``'s ``batch`` keys; ``torch_batch`` / ``our_batch`` convert it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = batch, size

    def img() -> np.ndarray:
        return rng.normal(size=(b, s, s, 3)).astype(np.float32)

    mask_x = rng.integers(0, num_classes, (b, s, s))
    mask_x[:, : s // 12] = 255
    out: dict[str, Any] = {"img_x": img(), "mask_x": mask_x}
    for sfx in ("", "_mix"):
        for view in ("w", "s1", "s2"):
            out[f"img_u_{view}{sfx}"] = img()
        ignore = np.zeros((b, s, s), np.int64)
        ignore[: b // 2, :, s - s // 6:] = 255  # right padding in the first half
        out["ignore_mask" + sfx] = ignore
        label = rng.integers(0, num_classes, (b, s, s))
        label[(rng.random((b, s, s)) < 0.2) | (ignore == 255)] = 255
        out["label_u" + sfx] = label
    for name in ("cutmix_box1", "cutmix_box2"):
        box = np.zeros((b, s, s), bool)
        for i in range(0, b, 2):
            h = w = int(s * np.sqrt(rng.uniform(0.02, 0.4)))
            y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            box[i, y: y + h, x: x + w] = True
        out[name] = box
    return out


def torch_batch(b: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``random_batch``-style numpy -> the reference's tensors: NCHW images of ``dtype``, long maps."""
    import numpy as np

    out = {}
    for k, v in b.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.permute(0, 3, 1, 2).to(dtype).contiguous() if v.ndim == 4 else t.long()
    return out


def our_batch(b: dict[str, Any], dtype: Any, fp_masks: tuple[Any, Any]) -> dict[str, Any]:
    """The same batch as ``zsp_jax.train.step``'s finalized batch (numpy, NHWC images of ``dtype``), with
    the feature-perturbation masks ``fp_masks`` ((2B, C_low), (2B, C_high), rows [labelled; weak])."""
    import numpy as np

    def unl(sfx: str) -> dict[str, Any]:
        return {"image_w": b["img_u_w" + sfx].astype(dtype), "image_s1": b["img_u_s1" + sfx].astype(dtype),
                "image_s2": b["img_u_s2" + sfx].astype(dtype), "ignore_mask": b["ignore_mask" + sfx].astype(np.int32),
                "cutmix_box1": b["cutmix_box1"], "cutmix_box2": b["cutmix_box2"],
                "pseudo_label": b["label_u" + sfx].astype(np.int32)}

    return {"labeled": {"image": b["img_x"].astype(dtype), "mask": b["mask_x"].astype(np.int32)},
            "unlabeled": unl(""), "unlabeled_mix": unl("_mix"), "fp_masks": tuple(m.astype(dtype) for m in fp_masks)}

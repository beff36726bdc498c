"""UniMatch V2's training iteration and optimiser in PyTorch, for the V2 step parity tests.

UniMatch V2 (github LiheYoung/UniMatch-V2) has **no installable package**, so this file is a
literal re-statement, written for this project, of one iteration of ``unimatch_v2.py`` at commit
``f6afb4df`` (read, not copied), with V2's optimiser construction, its poly learning rate and its
EMA teacher update:

1. the EMA model (``model_ema``, a deep copy of the model, eval mode, no gradients) predicts the
   weak view under ``no_grad``: confidence = max softmax, pseudo label = argmax;
2. CutMix, in place, of each strong view with **the batch flipped** (``img_u_s1.flip(0)``:
   sample i takes the box content of sample B-1-i, an odd batch's middle sample mixes with
   itself); the pseudo labels, confidences and ignore masks are CutMixed the same way;
3. ``pred_x = model(img_x)``, then one forward of ``cat(u_s1, u_s2)`` with ``comp_drop=True``
   (complementary dropout of the encoder features; V2 has no feature-perturbation stream);
4. ``loss_x = CrossEntropyLoss(ignore_index=255)``; each strong term
   ``sum(CE * (conf >= thresh) * (ignore != 255)) / count(ignore_cutmixed != 255)``;
   ``loss = (loss_x + (loss_s1 + loss_s2) / 2) / 2``; the logged mask ratio counts the confident
   pixels of the **un-mixed** weak view over its non-padding pixels;
5. ``optimizer.zero_grad(); loss.backward(); optimizer.step()``, **then** the poly rate for the
   next iteration, ``lr = base (1 - iters / total) ** 0.9`` (so iterations 0 and 1 both run at
   ``base``), the head at ``lr * lr_multi``;
6. the EMA of parameters and buffers with ``ema_ratio = min(1 - 1 / (iters + 1), 0.996)``,
   ``iters`` the index of the iteration just taken (the EMA equals the student after iteration 0
   and is a running mean of the students until iteration 249).

The optimiser (``make_optimizer``) is V2's ``AdamW`` with two groups: the encoder's parameters
that require a gradient at ``lr`` and every parameter whose name lacks ``backbone`` at
``lr * lr_multi``; betas (0.9, 0.999), weight decay 0.01 (``p *= 1 - group_lr * wd``, on every
parameter of the groups: norms, biases, ``pos_embed``, ``cls_token``, LayerScale). torch's AdamW
skips a parameter whose ``.grad`` is None: V2's never-read ``mask_token`` and
``head.scratch.refinenet4.resConfUnit1`` (DDP with ``find_unused_parameters=True`` leaves the
gradient of a globally unused parameter untouched, i.e. None after ``zero_grad``).

Differences from V2's script, none of which changes what one iteration computes:

* The complementary-dropout mask (``comp_drop_mask``, (2B, C): rows [strong 1; strong 2]) and the
  CutMix boxes are inputs, so that both implementations use the same ones.
* ``gpus`` re-states a run on that many GPUs on one process: GPU g holds the g-th equal share of
  every batch, flips, CutMixes and normalises its losses within its share, and runs its own
  forwards (its complementary-dropout rows are its shares of the two halves of the mask); the
  losses are averaged over GPUs, which is what DDP's gradient average computes. The model has no
  BatchNorm, so the per-GPU forwards are the model's only coupling and need no SyncBN.
* ``mode="zsp"``: the zero-shot labels (``label_u``, 255 = uncovered) are the strong views'
  targets (CutMixed with the flipped batch like V2's), with
  ``CrossEntropyLoss(label_smoothing=eps, ignore_index=255, reduction="none")`` and V2's
  normaliser; the EMA forward is skipped (its prediction is not used). The logged mask ratio is
  then the covered share of the weak view's non-padding pixels.
* The OHEM criterion (V2's Cityscapes config) is not re-stated: ``CELoss`` only.

Models: ``zsp_jax.references.unimatch_v2_model.DPT`` (``forward(x, comp_drop=..., comp_drop_mask=...)``)
on ``zsp_jax.references.dinov2.Dinov2Backbone``. Tensors are NCHW.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

IGNORE = 255


def make_optimizer(model: nn.Module, lr: float, lr_multi: float, *, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.01) -> torch.optim.AdamW:
    """V2's AdamW: the encoder's trainable parameters at ``lr``, every parameter named without ``backbone`` at
    ``lr * lr_multi``."""
    return torch.optim.AdamW(
        [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr},
         {"params": [p for name, p in model.named_parameters() if "backbone" not in name], "lr": lr * lr_multi}],
        lr=lr, betas=betas, weight_decay=weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, lr_multi: float, iters: int, total_iters: int,
                power: float = 0.9) -> None:
    """What V2 does after ``optimizer.step()`` of iteration ``iters`` (the rate of the next one)."""
    lr = base_lr * (1 - iters / total_iters) ** power
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * lr_multi


def make_ema(model: nn.Module) -> nn.Module:
    """V2's teacher: a deep copy of the model in eval mode whose parameters need no gradient."""
    model_ema = copy.deepcopy(model)
    model_ema.eval()
    for param in model_ema.parameters():
        param.requires_grad = False
    return model_ema


def ema_ratio(iters: int) -> float:
    """V2's EMA ratio after iteration ``iters`` (0-based): 0 after the first, k/(k+1), capped at 0.996."""
    return min(1 - 1 / (iters + 1), 0.996)


def update_ema(model: nn.Module, model_ema: nn.Module, iters: int) -> None:
    """V2's EMA update of every parameter and buffer after iteration ``iters``."""
    ratio = ema_ratio(iters)
    for param, param_ema in zip(model.parameters(), model_ema.parameters()):
        param_ema.copy_(param_ema * ratio + param.detach() * (1 - ratio))
    for buffer, buffer_ema in zip(model.buffers(), model_ema.buffers()):
        buffer_ema.copy_(buffer_ema * ratio + buffer.detach() * (1 - ratio))


def _cutmix_(target: torch.Tensor, box: torch.Tensor, source: torch.Tensor) -> None:
    """V2's in-place CutMix line: ``target[box == 1] = source[box == 1]`` (box broadcast over channels)."""
    where = box.unsqueeze(1).expand(target.shape) == 1 if target.dim() == 4 else box == 1
    target[where] = source[where]


def gpu_losses(model: nn.Module, model_ema: nn.Module, batch: dict[str, torch.Tensor], comp_drop_mask: torch.Tensor,
               *, conf_thresh: float, mode: str, label_smoothing: float) -> dict[str, torch.Tensor]:
    """The loss terms one GPU computes from its share of the batch (lines of ``unimatch_v2.py``'s loop).

    ``batch`` holds this GPU's share (``step``'s keys); ``comp_drop_mask`` (2b, C) its mask rows.
    Returns the loss terms (with graph) and the mask-ratio counts.
    """
    img_x, mask_x = batch["img_x"], batch["mask_x"]
    img_u_w, img_u_s1, img_u_s2 = batch["img_u_w"], batch["img_u_s1"].clone(), batch["img_u_s2"].clone()
    ignore_mask, cutmix_box1, cutmix_box2 = batch["ignore_mask"], batch["cutmix_box1"], batch["cutmix_box2"]
    criterion_l = nn.CrossEntropyLoss(ignore_index=IGNORE)

    if mode == "zsp":  # the targets are given: the teacher's prediction is not needed
        mask_u_w = batch["label_u"]
        conf_u_w = torch.ones(mask_u_w.shape, dtype=img_u_w.dtype)
        criterion_u = nn.CrossEntropyLoss(reduction="none", ignore_index=IGNORE, label_smoothing=label_smoothing)
    else:
        with torch.no_grad():
            pred_u_w = model_ema(img_u_w).detach()
            conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
            mask_u_w = pred_u_w.argmax(dim=1)
        criterion_u = nn.CrossEntropyLoss(reduction="none")

    _cutmix_(img_u_s1, cutmix_box1, img_u_s1.flip(0))
    _cutmix_(img_u_s2, cutmix_box2, img_u_s2.flip(0))

    pred_x = model(img_x)
    pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2)), comp_drop=True,
                                 comp_drop_mask=comp_drop_mask).chunk(2)

    mask_u_w_cutmixed1, conf_u_w_cutmixed1, ignore_mask_cutmixed1 = mask_u_w.clone(), conf_u_w.clone(), \
        ignore_mask.clone()
    mask_u_w_cutmixed2, conf_u_w_cutmixed2, ignore_mask_cutmixed2 = mask_u_w.clone(), conf_u_w.clone(), \
        ignore_mask.clone()
    _cutmix_(mask_u_w_cutmixed1, cutmix_box1, mask_u_w.flip(0))
    _cutmix_(conf_u_w_cutmixed1, cutmix_box1, conf_u_w.flip(0))
    _cutmix_(ignore_mask_cutmixed1, cutmix_box1, ignore_mask.flip(0))
    _cutmix_(mask_u_w_cutmixed2, cutmix_box2, mask_u_w.flip(0))
    _cutmix_(conf_u_w_cutmixed2, cutmix_box2, conf_u_w.flip(0))
    _cutmix_(ignore_mask_cutmixed2, cutmix_box2, ignore_mask.flip(0))

    loss_x = criterion_l(pred_x, mask_x)
    if mode == "zsp":
        keep1 = (mask_u_w_cutmixed1 != IGNORE) & (ignore_mask_cutmixed1 != IGNORE)
        keep2 = (mask_u_w_cutmixed2 != IGNORE) & (ignore_mask_cutmixed2 != IGNORE)
        counted_w = (mask_u_w != IGNORE) & (ignore_mask != IGNORE)
    else:
        keep1 = (conf_u_w_cutmixed1 >= conf_thresh) & (ignore_mask_cutmixed1 != IGNORE)
        keep2 = (conf_u_w_cutmixed2 >= conf_thresh) & (ignore_mask_cutmixed2 != IGNORE)
        counted_w = (conf_u_w >= conf_thresh) & (ignore_mask != IGNORE)

    loss_u_s1 = criterion_u(pred_u_s1, mask_u_w_cutmixed1)
    loss_u_s1 = loss_u_s1 * keep1
    loss_u_s1 = loss_u_s1.sum() / (ignore_mask_cutmixed1 != IGNORE).sum().item()
    loss_u_s2 = criterion_u(pred_u_s2, mask_u_w_cutmixed2)
    loss_u_s2 = loss_u_s2 * keep2
    loss_u_s2 = loss_u_s2.sum() / (ignore_mask_cutmixed2 != IGNORE).sum().item()
    loss_u_s = (loss_u_s1 + loss_u_s2) / 2.0
    loss = (loss_x + loss_u_s) / 2.0
    return {"loss": loss, "loss_x": loss_x, "loss_s": loss_u_s, "loss_s1": loss_u_s1, "loss_s2": loss_u_s2,
            "counted": counted_w.sum().item(), "valid": (ignore_mask != IGNORE).sum().item()}


def step(model: nn.Module, model_ema: nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, Any], *,
         iters: int, total_iters: int, base_lr: float, lr_multi: float, comp_drop_mask: torch.Tensor,
         conf_thresh: float = 0.95, mode: str = "unimatch_v2", label_smoothing: float = 0.1, gpus: int = 1,
         lr_power: float = 0.9) -> dict[str, Any]:
    """One UniMatch V2 (or zsp) iteration ``iters`` of ``total_iters``; returns its loss terms and mask ratio.

    Args:
      model / model_ema: the student (``DPT``) and its EMA teacher (``make_ema``).
      optimizer: ``make_optimizer(model, ...)``; None: no update, no new rate, no EMA update (the
        gradients stay in ``.grad``, for gradient comparisons).
      batch: ``img_x`` (B, 3, S, S), ``mask_x`` (B, S, S) long (255 = ignore); ``img_u_w``,
        ``img_u_s1``, ``img_u_s2`` (B, 3, S, S); ``ignore_mask`` (B, S, S) long (255 = padding);
        ``cutmix_box1``, ``cutmix_box2`` (B, S, S) 0/1; for ``mode="zsp"`` ``label_u`` (B, S, S)
        long (255 = uncovered). Images ImageNet-normalised, S a multiple of 14.
      comp_drop_mask: (2B, C) complementary-dropout mask, rows [strong 1; strong 2] (values 0/1/2).
      conf_thresh, label_smoothing: V2's ``conf_thresh``; the zsp CE's eps.
      mode: ``unimatch_v2`` or ``zsp``.
      gpus: the number of GPUs of the re-stated run (it divides B; see the module docstring).

    Returns:
      ``loss``, ``loss_x``, ``loss_s``, ``loss_s1``, ``loss_s2`` (detached tensors, averaged over
      GPUs), ``mask_ratio`` (float, over the whole batch), ``lr`` (the backbone group's rate used
      by this iteration).
    """
    if mode not in ("unimatch_v2", "zsp"):
        raise ValueError(f"mode must be unimatch_v2 or zsp, got {mode!r}")
    n_u = batch["img_u_w"].shape[0]
    half_s1, half_s2 = comp_drop_mask[:n_u], comp_drop_mask[n_u:]
    model.train()
    per_gpu = []
    for g in range(gpus):
        share = {k: v.chunk(gpus)[g] for k, v in batch.items()}
        mask = torch.cat((half_s1.chunk(gpus)[g], half_s2.chunk(gpus)[g]))
        per_gpu.append(gpu_losses(model, model_ema, share, mask, conf_thresh=conf_thresh, mode=mode,
                                  label_smoothing=label_smoothing))
    # DDP averages the GPUs' gradients: the gradient of the GPUs' mean loss
    terms = {k: sum(p[k] for p in per_gpu) / gpus for k in ("loss", "loss_x", "loss_s", "loss_s1", "loss_s2")}
    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else base_lr

    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if optimizer is not None:
        optimizer.step()
        set_poly_lr(optimizer, base_lr, lr_multi, iters, total_iters, lr_power)
        update_ema(model, model_ema, iters)
    out: dict[str, Any] = {k: v.detach() for k, v in terms.items()}
    out["mask_ratio"] = sum(p["counted"] for p in per_gpu) / sum(p["valid"] for p in per_gpu)
    out["lr"] = lr
    return out


# ------------------------------------------------------------------------ one batch, both sides


def random_batch(batch: int, size: int, num_classes: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch in the reference's naming as numpy (NHWC images, already normalised): random images and labels,
    an ignored band in the labelled masks, padding on the right of the first half of the unlabelled
    images, zero-shot labels with 20 % uncovered, and one CutMix box in every other sample (the odd
    ones have none, as with V2's p = 0.5).
    """
    rng = np.random.default_rng(seed)
    b, s = batch, size

    def img() -> np.ndarray:
        return rng.normal(size=(b, s, s, 3))

    mask_x = rng.integers(0, num_classes, (b, s, s))
    mask_x[:, : max(s // 12, 1)] = IGNORE
    ignore = np.zeros((b, s, s), np.int64)
    ignore[: max(b // 2, 1), :, s - s // 5:] = IGNORE
    label = rng.integers(0, num_classes, (b, s, s))
    label[(rng.random((b, s, s)) < 0.2) | (ignore == IGNORE)] = IGNORE
    out: dict[str, np.ndarray] = {"img_x": img(), "mask_x": mask_x, "img_u_w": img(), "img_u_s1": img(),
                                  "img_u_s2": img(), "ignore_mask": ignore, "label_u": label}
    for name in ("cutmix_box1", "cutmix_box2"):
        box = np.zeros((b, s, s), bool)
        for i in range(0, b, 2):
            h = w = max(int(s * np.sqrt(rng.uniform(0.1, 0.4))), 2)
            y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            box[i, y: y + h, x: x + w] = True
        out[name] = box
    return out


def torch_batch(b: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``random_batch``-style numpy -> the reference's tensors: NCHW images of ``dtype``, long maps, 0/1 boxes."""
    out = {}
    for k, v in b.items():
        t = torch.from_numpy(np.array(v))  # a writable copy (jax.device_get gives read-only arrays)
        if v.ndim == 4:
            out[k] = t.permute(0, 3, 1, 2).to(dtype).contiguous()
        elif k.startswith("cutmix_box"):
            out[k] = t.to(dtype)  # V2's boxes are float tensors of 0 / 1
        else:
            out[k] = t.long()
    return out


def our_batch(b: dict[str, np.ndarray], dtype: Any, comp_drop_mask: np.ndarray | None = None) -> dict[str, Any]:
    """The same batch as ``zsp_jax.train.v2_step``'s finalized batch (numpy, NHWC images of ``dtype``), with the
    complementary-dropout mask ``comp_drop_mask`` (2B, C) when given."""
    out: dict[str, Any] = {
        "labeled": {"image": b["img_x"].astype(dtype), "mask": b["mask_x"].astype(np.int32)},
        "unlabeled": {"image_w": b["img_u_w"].astype(dtype), "image_s1": b["img_u_s1"].astype(dtype),
                      "image_s2": b["img_u_s2"].astype(dtype), "ignore_mask": b["ignore_mask"].astype(np.int32),
                      "cutmix_box1": b["cutmix_box1"].astype(bool), "cutmix_box2": b["cutmix_box2"].astype(bool),
                      "pseudo_label": b["label_u"].astype(np.int32)}}
    if comp_drop_mask is not None:
        out["comp_drop_mask"] = np.asarray(comp_drop_mask, dtype)
    return out

"""Step parity with UniMatch V2: our pure V2 train step against a PyTorch re-statement of ``unimatch_v2.py``
(``zsp_jax.references.unimatch_v2_step``) on the same tiny DINOv2 + DPT weights, batch, CutMix boxes and
complementary-dropout masks.

* float64, 3 AdamW steps (``unimatch_v2``; ``zsp`` with ``loss_groups=2``, a 2-GPU V2 run): every loss
  term of every step, the mask ratio and rate, the first step's gradients, the parameters and the EMA
  teacher after the 3 steps, <= 1e-9 relative. The key bias of every attention block has a gradient that
  is exactly zero in exact arithmetic (softmax ignores a shift shared by all keys), so both sides hold
  rounding noise there: it is compared absolutely. In float64 our encoder's attention runs in the inputs'
  precision (``helpers.attention_in_input_precision``): the shared attention computes in float32 by design.
* float32, the first step only (<= 1e-4), from a uint8 host batch through ``make_train_step_v2`` (the
  pipeline's layout, ``device_augment.finalize`` inside) with the complementary-dropout mask drawn by our
  step: Adam's first update is about ``lr * sign(g)`` and a gradient element whose sign float32 rounding
  decides moves by ``2 lr``, so float32 runs of both sides part ways over later steps.
* ``lock_backbone``: the encoder neither updated nor decayed (nor its EMA moved), the head as the reference's.
* 8 simulated devices against 1 on one step, parameters replicated and split FSDP-style (fsdp = 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zsp_jax.models.dinov2.model as dinov2_model
from tests.train_v2.helpers import (
    CONFIG,
    FAST_COMPILE,
    SIZE,
    as_ours,
    attention_in_input_precision,
    flat,
    grads_as_ours,
    ours_from,
    reference,
)
from zsp_jax.data import device_augment
from zsp_jax.references import unimatch_v2_model as ref_model
from zsp_jax.references import unimatch_v2_step as ref_step
from zsp_jax.train import state as state_lib
from zsp_jax.train import v2_state, v2_step
from zsp_jax.utils.bench import relative_error

MULTI, TOTAL, STEPS = 40.0, 10, 3
# float64: a small rate, so that the teacher's confidences stay spread around the threshold over the
# 3 steps (checked below); float32: a larger one, so that one step moves the parameters far more than
# float32 resolves them.
LR64, LR32 = 1e-5, 1e-3
CONF = 0.55
EPS = 0.1
KEY_BIAS_ATOL32 = 0.1 * LR32  # measured: see _worst
TERMS = ("loss", "loss_x", "loss_s", "loss_s1", "loss_s2")
# torch's AdamW never sees these (gradient None): V2's never-read mask token and refinenet4's first unit
REF_SKIPPED = {"backbone.model.embeddings.mask_token"} | {
    f"head.scratch.refinenet4.resConfUnit1.conv{i}.{t}" for i in (1, 2) for t in ("weight", "bias")}


def _is_key_bias(name: str) -> bool:
    return name.endswith("attn.k.bias")


def _worst(ours: dict, ref: dict, *, key_bias_atol: float | None = None) -> tuple[float, str]:
    """(largest per-tensor relative error, its name). With ``key_bias_atol`` a key bias (its gradient is rounding
    noise, which Adam scales up to as much as ``lr * |g| / (|g| + eps)``) counts as 0 when its largest absolute
    difference is within ``key_bias_atol``, else as inf."""
    assert set(ours) == set(ref)
    errors = []
    for name, value in ours.items():
        if key_bias_atol is not None and _is_key_bias(name):
            errors.append((0.0 if np.max(np.abs(value - ref[name])) <= key_bias_atol else np.inf, name))
        else:
            errors.append((relative_error(value, ref[name]), name))
    return max(errors)


# ------------------------------------------------------------------------------------------ float64


def _run_fp64(mode: str, groups: int) -> dict:
    """3 steps on both sides; our metrics / first gradients / final params and EMA, and the reference's."""
    b = 4
    raw = ref_step.random_batch(b, SIZE, CONFIG.num_classes, seed=1)
    if groups == 1:  # V2's own draw (one GPU)
        mask = ref_model.draw_complementary_mask(2 * b, CONFIG.embed_dim, generator=torch.Generator().manual_seed(3))
        mask = mask.double().numpy()
    else:  # each GPU draws its own kept rows: our per-share draw
        mask = np.asarray(v2_step.comp_drop_masks(jax.random.key(3), b, CONFIG.embed_dim, groups), np.float64)
    ref = reference(dtype=torch.float64)
    options = v2_step.StepOptionsV2(mode=mode, conf_thresh=CONF, label_smoothing=EPS, loss_groups=groups)
    with jax.enable_x64(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dinov2_model, "dot_product_attention", attention_in_input_precision)
        graphdef, params = ours_from(ref, param_dtype=jnp.float64)
        settings = v2_state.OptimizerSettingsV2(lr=LR64, lr_multi=MULTI)
        tx, schedule = v2_state.make_optimizer_v2(settings, params, TOTAL)
        state = v2_state.init_state_v2(params, tx)
        batch = jax.tree.map(jnp.asarray, ref_step.our_batch(raw, np.float64, mask))
        update = jax.jit(v2_step.make_update_fn_v2(graphdef, tx, options, schedule, return_grads=True),
                         compiler_options=FAST_COMPILE)
        metrics = []
        for i in range(STEPS):
            state, m, g = update(state, batch, jax.random.key(0))
            metrics.append(jax.tree.map(np.asarray, m))
            if i == 0:
                grads = flat(g)
        ours = {"metrics": metrics, "grads": grads, "params": flat(state.params), "ema": flat(state.ema_params),
                "initial": flat(params), "labels": flat(v2_state.param_labels_v2(params))}

    ref_ema = ref_step.make_ema(ref)
    opt = ref_step.make_optimizer(ref, LR64, MULTI)
    tb = ref_step.torch_batch(raw, torch.float64)
    tm = torch.from_numpy(mask)
    ref_metrics = []
    for i in range(STEPS):
        ref_metrics.append(ref_step.step(ref, ref_ema, opt, tb, iters=i, total_iters=TOTAL, base_lr=LR64,
                                         lr_multi=MULTI, comp_drop_mask=tm, conf_thresh=CONF, mode=mode,
                                         label_smoothing=EPS, gpus=groups))
        if i == 0:  # .grad holds step 0's gradients until the next zero_grad
            ref_grads = grads_as_ours(ref)
            skipped = {n for n, p in ref.named_parameters() if p.grad is None}
    return {"ours": ours, "ref_metrics": ref_metrics, "ref_grads": ref_grads, "ref_params": as_ours(ref),
            "ref_ema": as_ours(ref_ema), "ref_skipped": skipped, "raw": raw, "mask": mask}


@pytest.mark.parametrize("mode, groups", [("unimatch_v2", 1), ("zsp", 2)])
def test_three_steps_match_the_pytorch_v2_step_in_float64(mode, groups):
    run = _run_fp64(mode, groups)
    ours, tol = run["ours"], 1e-9
    for i, (m, r) in enumerate(zip(ours["metrics"], run["ref_metrics"])):
        assert m["finite"] == 1
        # the comparison has something to compare: counted and uncounted pixels, boxes, padding
        assert 0.1 < r["mask_ratio"] < 0.9 and abs(float(m["mask_ratio"]) - r["mask_ratio"]) < 1e-6, (i, r)
        for term in TERMS:
            assert float(r[term]) > 0.05, (i, term)
            assert relative_error(m[term], r[term].numpy()) <= tol, (i, term, float(m[term]), float(r[term]))
        # the rate of the step: base at steps 0 and 1 (V2 sets the poly rate after the step), then poly
        assert abs(float(m["lr"]) - r["lr"]) <= 1e-6 * r["lr"], (i, float(m["lr"]), r["lr"])
        assert float(m["ema_ratio"]) == pytest.approx(min(1 - 1 / (i + 1), 0.996))
    assert run["ref_metrics"][2]["lr"] < LR64 == run["ref_metrics"][1]["lr"]

    # gradients of the first step
    grads, ref_grads = ours["grads"], run["ref_grads"]
    assert set(grads) == set(ref_grads)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for name, g in grads.items():
        if _is_key_bias(name):  # zero in exact arithmetic: both sides hold rounding noise only
            assert max(float(np.max(np.abs(g))), float(np.max(np.abs(ref_grads[name])))) <= 1e-12 * scale, name
        elif name == "backbone.pos_embed":  # its gradient passes the float32 cast on both sides (helpers.reference)
            assert relative_error(g, ref_grads[name]) <= 1e-6, relative_error(g, ref_grads[name])
        else:
            assert relative_error(g, ref_grads[name]) <= tol, (name, relative_error(g, ref_grads[name]))
    # what torch's AdamW skips (gradient None) is what our optimiser freezes: the mask token (refinenet4's
    # first unit is not built in our head)
    assert run["ref_skipped"] == REF_SKIPPED
    assert {k for k, v in ours["labels"].items() if v == "frozen"} == {"backbone.mask_token"}

    # parameters and EMA teacher after 3 steps (Adam moments, per-group decay, poly rate, head at x40, EMA ratio)
    for key in ("params", "ema"):
        ref_tree = run["ref_" + key]
        assert set(ours[key]) == set(ref_tree)
        worst = max((relative_error(v, ref_tree[k]), k) for k, v in ours[key].items())
        assert worst[0] <= tol, (key, worst)
    initial, params, ema = ours["initial"], ours["params"], ours["ema"]
    for name in params:
        if name == "backbone.mask_token":  # not touched: no update and no weight decay
            np.testing.assert_array_equal(params[name], initial[name])
        else:
            assert relative_error(params[name], initial[name]) > 1e-7, name
    # the EMA is the running mean of the 3 students, not the last one
    assert relative_error(ema["head.output_conv2.kernel"], params["head.output_conv2.kernel"]) > 1e-5

    if groups > 1:  # the grouping changes the losses here (the shares' pixel counts and CutMix partners differ)
        fresh = reference(dtype=torch.float64)
        whole = ref_step.step(fresh, ref_step.make_ema(fresh), None, ref_step.torch_batch(run["raw"], torch.float64),
                              iters=0, total_iters=TOTAL, base_lr=LR64, lr_multi=MULTI,
                              comp_drop_mask=torch.from_numpy(run["mask"]), conf_thresh=CONF, mode=mode,
                              label_smoothing=EPS)
        first = run["ref_metrics"][0]
        assert max(abs(float(whole[t]) - float(first[t])) / float(first[t]) for t in ("loss_s1", "loss_s2")) > 1e-3


# ------------------------------------------------------------------------------------------ float32


def _host_batch(b: int, seed: int) -> dict:
    """A pipeline batch (uint8, NHWC) with the strong views and CutMix boxes made on the host, zero-shot labels."""
    rng = np.random.default_rng(seed)
    s, c = SIZE, CONFIG.num_classes

    def img() -> np.ndarray:
        return rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)

    mask = rng.integers(0, c, (b, s, s)).astype(np.uint8)
    mask[:, :3] = 255
    ignore = np.zeros((b, s, s), np.uint8)
    ignore[: b // 2, :, -8:] = 255
    label = rng.integers(0, c, (b, s, s)).astype(np.uint8)
    label[(rng.random((b, s, s)) < 0.2) | (ignore == 255)] = 255
    boxes = []
    for _ in range(2):
        box = np.zeros((b, s, s), np.uint8)
        for i in range(0, b, 2):
            y, x = rng.integers(0, s // 2, 2)
            box[i, y: y + s // 2, x: x + s // 3] = 1
        boxes.append(box)
    return {"labeled": {"image": img(), "mask": mask},
            "unlabeled": {"image": img(), "image_s1": img(), "image_s2": img(), "ignore_mask": ignore,
                          "cutmix_box1": boxes[0], "cutmix_box2": boxes[1], "pseudo_label": label}}


def _reference_batch(finalized: dict) -> dict:
    """``finalize``'s output (numpy) in the reference's naming (``random_batch``'s keys)."""
    lab, unl = finalized["labeled"], finalized["unlabeled"]
    return {"img_x": lab["image"], "mask_x": lab["mask"], "img_u_w": unl["image_w"], "img_u_s1": unl["image_s1"],
            "img_u_s2": unl["image_s2"], "ignore_mask": unl["ignore_mask"], "cutmix_box1": unl["cutmix_box1"],
            "cutmix_box2": unl["cutmix_box2"], "label_u": unl["pseudo_label"]}


def _sharded_step(graphdef, params, options, host, *, devices, fsdp, lock_backbone=False):
    """One ``make_train_step_v2`` step on a ("data", "fsdp") mesh, placed as the trainer places it."""
    settings = v2_state.OptimizerSettingsV2(lr=LR32, lr_multi=MULTI)
    tx, schedule = v2_state.make_optimizer_v2(settings, params, TOTAL, lock_backbone=lock_backbone)
    host_state = v2_state.init_state_v2(params, tx)
    mesh = state_lib.make_mesh(fsdp, devices=devices)
    shardings = state_lib.state_shardings(host_state, mesh)
    state = state_lib.place(host_state, shardings)
    batch = state_lib.global_batch(host, state_lib.batch_sharding(mesh))
    rng = jax.random.key(0)
    step = jax.jit(v2_step.make_train_step_v2(graphdef, tx, options, schedule), donate_argnums=(0,),
                   out_shardings=(shardings, NamedSharding(mesh, P())), compiler_options=FAST_COMPILE)
    new, metrics = step(state, batch, rng)
    return new, jax.tree.map(np.asarray, metrics)


@pytest.fixture(scope="module")
def fp32_run():
    """zsp (targets without a confidence threshold, which float32 rounding could flip pixel by pixel), 8 images."""
    b = 8
    host = _host_batch(b, seed=5)
    ref = reference(dtype=torch.float32)
    graphdef, params = ours_from(ref)
    options = v2_step.StepOptionsV2(mode="zsp", label_smoothing=EPS)
    state, metrics = _sharded_step(graphdef, params, options, host, devices=jax.devices()[:1], fsdp=1)
    # the reference gets the mask our step drew (fold_in(rng, step 0))
    mask = v2_step.comp_drop_masks(jax.random.fold_in(jax.random.key(0), 0), b, CONFIG.embed_dim)
    tb = ref_step.torch_batch(_reference_batch(jax.device_get(device_augment.finalize(host))), torch.float32)
    ref_ema = ref_step.make_ema(ref)
    opt = ref_step.make_optimizer(ref, LR32, MULTI)
    ref_metrics = ref_step.step(ref, ref_ema, opt, tb, iters=0, total_iters=TOTAL, base_lr=LR32, lr_multi=MULTI,
                                comp_drop_mask=torch.from_numpy(np.array(mask)), mode="zsp", label_smoothing=EPS)
    return {"host": host, "graphdef": graphdef, "params": params, "options": options, "metrics": metrics,
            "state": jax.tree.map(np.asarray, (state.params, state.ema_params)), "initial": flat(params),
            "ref_metrics": ref_metrics, "ref_params": as_ours(ref), "ref_ema": as_ours(ref_ema)}


def test_first_step_matches_the_pytorch_v2_step_in_float32(fp32_run):
    m, r, tol = fp32_run["metrics"], fp32_run["ref_metrics"], 1e-4
    assert m["finite"] == 1 and 0.3 < r["mask_ratio"] < 0.95
    assert abs(float(m["mask_ratio"]) - r["mask_ratio"]) < 1e-6
    for term in TERMS:
        assert float(r[term]) > 0.05 and relative_error(m[term], r[term].numpy()) <= tol, term
    params, ema = (flat(t) for t in fp32_run["state"])
    for ours, ref_tree in ((params, fp32_run["ref_params"]), (ema, fp32_run["ref_ema"])):
        worst = _worst(ours, ref_tree, key_bias_atol=KEY_BIAS_ATOL32)
        assert worst[0] <= tol, worst
    # the step moved every trained parameter, and the EMA after step 0 is the student
    initial = fp32_run["initial"]
    assert all(relative_error(v, initial[k]) > 1e-6 for k, v in params.items() if k != "backbone.mask_token")
    for k, v in params.items():
        np.testing.assert_array_equal(ema[k], v)


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eight_devices_equal_one(fp32_run, num_devices, fsdp):
    """One step on 8 devices (batch split 8 ways; parameters, EMA and AdamW moments replicated or split over
    fsdp = 2) equals the 1-device step to float32 rounding. Per tensor relative to its largest value: a
    different reduction order moves gradients by rounding, which Adam turns into update differences up to
    ~1e-3 lr where a gradient is near its eps (and ~1e-2 lr on the key biases, whose gradient is noise)."""
    assert num_devices == 8
    state, metrics = _sharded_step(fp32_run["graphdef"], fp32_run["params"], fp32_run["options"], fp32_run["host"],
                                   devices=jax.devices(), fsdp=fsdp)
    if fsdp > 1:  # parameters, EMA and both moments split over the fsdp axis
        largest = max(jax.tree.leaves(state.params), key=lambda x: x.size)
        assert largest.addressable_shards[0].data.size * fsdp == largest.size
        for tree in (state.ema_params, state.opt_state):
            biggest = max(jax.tree.leaves(tree), key=lambda x: x.size)
            assert biggest.size == largest.size and biggest.addressable_shards[0].data.size * fsdp == biggest.size
    one = fp32_run["metrics"]
    for k in TERMS + ("mask_ratio", "grad_norm", "lr", "finite"):
        np.testing.assert_allclose(metrics[k], one[k], rtol=1e-5, err_msg=k)
    for ours, single in zip((state.params, state.ema_params), fp32_run["state"]):
        worst = _worst(flat(jax.tree.map(np.asarray, ours)), flat(single), key_bias_atol=KEY_BIAS_ATOL32)
        assert worst[0] <= 1e-4, worst


def test_lock_backbone_freezes_the_encoder_and_matches_the_reference():
    """V2's ``lock_backbone`` (ADE20K): the model stops gradients at the encoder, the optimiser leaves it out
    (no update, no decay), the EMA of a constant encoder stays it; the head trains as V2's does."""
    config = CONFIG.replace(lock_backbone=True)
    b = 4
    host = _host_batch(b, seed=6)
    ref = reference(config, dtype=torch.float32, lock_backbone=True)
    graphdef, params = ours_from(ref, config)
    options = v2_step.StepOptionsV2(mode="zsp", label_smoothing=EPS)
    state, metrics = _sharded_step(graphdef, params, options, host, devices=jax.devices()[:1], fsdp=1,
                                   lock_backbone=True)
    initial, new, ema = flat(params), flat(jax.tree.map(np.asarray, state.params)), flat(
        jax.tree.map(np.asarray, state.ema_params))
    mask = v2_step.comp_drop_masks(jax.random.fold_in(jax.random.key(0), 0), b, CONFIG.embed_dim)
    tb = ref_step.torch_batch(_reference_batch(jax.device_get(device_augment.finalize(host))), torch.float32)
    opt = ref_step.make_optimizer(ref, LR32, MULTI)
    assert len(opt.param_groups[0]["params"]) == 0  # V2 gives the frozen encoder no optimiser group
    ref_ema = ref_step.make_ema(ref)
    ref_metrics = ref_step.step(ref, ref_ema, opt, tb, iters=0, total_iters=TOTAL, base_lr=LR32, lr_multi=MULTI,
                                comp_drop_mask=torch.from_numpy(np.array(mask)), mode="zsp", label_smoothing=EPS)
    ref_params = as_ours(ref, config)
    assert relative_error(metrics["loss"], ref_metrics["loss"].numpy()) <= 1e-4
    for name, value in new.items():
        if name.startswith("backbone."):
            np.testing.assert_array_equal(value, initial[name], err_msg=name)
            np.testing.assert_array_equal(ema[name], initial[name], err_msg=name)
        else:
            assert relative_error(value, initial[name]) > 1e-6, name
            assert relative_error(value, ref_params[name]) <= 1e-4, name
    # no AdamW moments are kept for the encoder: two per head parameter only
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    head = [v for k, v in initial.items() if k.startswith("head.")]
    assert sorted(x.size for x in moments) == sorted(2 * [v.size for v in head])

"""V2's optimiser and EMA teacher: our optax chain against ``torch.optim.AdamW`` built as ``unimatch_v2.py`` builds
it (the re-statement's ``make_optimizer``), with the poly rate set after every step and V2's EMA update, over
many steps in float64, on a small module whose parameter names decide the groups as in the segmenter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from zsp_jax.references import unimatch_v2_step as ref_step
from zsp_jax.train import v2_state

LR, MULTI, TOTAL, STEPS = 0.01, 40.0, 12, 12


class _Net(torch.nn.Module):
    """``backbone`` (a linear layer, a LayerNorm, an unused ``mask_token``) and ``head`` (a linear layer)."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.lin = torch.nn.Linear(5, 4)
        self.backbone.norm = torch.nn.LayerNorm(4)
        self.backbone.mask_token = torch.nn.Parameter(torch.randn(1, 4))
        self.head = torch.nn.Module()
        self.head.lin = torch.nn.Linear(4, 3)


_LAYOUT = {"backbone.lin.weight": ("backbone", "lin", "kernel"), "backbone.lin.bias": ("backbone", "lin", "bias"),
           "backbone.norm.weight": ("backbone", "norm", "scale"), "backbone.norm.bias": ("backbone", "norm", "bias"),
           "backbone.mask_token": ("backbone", "mask_token"), "head.lin.weight": ("head", "lin", "kernel"),
           "head.lin.bias": ("head", "lin", "bias")}


def _as_tree(tensors: dict[str, torch.Tensor]) -> dict:
    """Torch name -> tensor (linear weights transposed) as our nested dict."""
    tree: dict = {}
    for name, path in _LAYOUT.items():
        value = tensors[name].detach().numpy().copy()  # not a view of the torch tensor, which the step changes
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if name.endswith("lin.weight") else value
    return tree


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():  # LayerNorm's 1 / 0 init and the biases randomised, so decay acts on every tensor
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("lock_backbone", [False, True])
def test_adamw_groups_decay_skipped_parameters_and_poly_match_torch(lock_backbone):
    net = _net()
    initial = _as_tree(dict(net.named_parameters()))
    rng = np.random.default_rng(0)
    grads = [{n: rng.normal(size=p.shape) for n, p in net.named_parameters()} for _ in range(STEPS)]
    if lock_backbone:
        for p in net.backbone.parameters():
            p.requires_grad = False
    opt = ref_step.make_optimizer(net, LR, MULTI)
    torch_lrs = []
    for i, g in enumerate(grads):
        torch_lrs.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        for name, p in net.named_parameters():
            # V2 never reads the mask token: its gradient stays None; a frozen encoder gets none either
            trained = name != "backbone.mask_token" and not (lock_backbone and name.startswith("backbone."))
            p.grad = torch.from_numpy(g[name].copy()) if trained else None
        opt.step()
        ref_step.set_poly_lr(opt, LR, MULTI, i, TOTAL)

    settings = v2_state.OptimizerSettingsV2(lr=LR, lr_multi=MULTI)
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, initial)
        tx, schedule = v2_state.make_optimizer_v2(settings, params, TOTAL, lock_backbone=lock_backbone)
        opt_state = tx.init(params)
        update = jax.jit(tx.update)
        for i, g in enumerate(grads):
            assert abs(float(schedule(i)) - torch_lrs[i][0]) < 1e-15 * LR  # the rate of step i
            # our gradient of an unused or frozen parameter is zero, not None
            tree = _as_tree({k: torch.from_numpy(v) for k, v in g.items()})
            tree["backbone"]["mask_token"] = np.zeros_like(tree["backbone"]["mask_token"])
            if lock_backbone:
                tree["backbone"] = jax.tree.map(np.zeros_like, tree["backbone"])
            updates, opt_state = update(jax.tree.map(jnp.asarray, tree), opt_state, params)
            params = optax.apply_updates(params, updates)
        ours = _flat(jax.tree.map(np.asarray, params))
    ref = _flat(_as_tree(dict(net.named_parameters())))
    start = _flat(initial)
    for name, value in ours.items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-12, atol=1e-14, err_msg=name)
        frozen = name == "backbone.mask_token" or (lock_backbone and name.startswith("backbone."))
        if frozen:  # neither updated nor decayed
            np.testing.assert_array_equal(value, start[name], err_msg=name)
        else:
            assert np.max(np.abs(value - start[name])) > 1e-3, name
    # the comparison has something to compare: the rate fell, the head ran 40x faster from the start
    assert torch_lrs[-1][0] < 0.3 * LR and torch_lrs[0] == torch_lrs[1] == (LR, LR * MULTI)


def test_decay_uses_each_groups_rate():
    """With zero gradients AdamW only decays: p (1 - lr wd) per step, the head with its own (40x) rate."""
    params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    tx, _ = v2_state.make_optimizer_v2(v2_state.OptimizerSettingsV2(lr=LR, lr_multi=MULTI), params, TOTAL)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["backbone"]["w"], -LR * 0.01, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["w"], -LR * MULTI * 0.01, rtol=1e-6)


def test_ema_matches_v2_over_300_steps():
    """V2's ratio min(1 - 1/(k+1), 0.996): the student after step 0, the running mean of the students until step
    249, then a fixed 0.996 decay."""
    torch.manual_seed(1)
    student, rng = torch.nn.Linear(3, 2).double(), np.random.default_rng(1)
    teacher = ref_step.make_ema(student)
    with jax.enable_x64(True):
        ema = {"w": jnp.asarray(teacher.weight.detach().numpy()), "b": jnp.asarray(teacher.bias.detach().numpy())}
        update = jax.jit(v2_state.ema_update)
        history = []
        for k in range(300):
            with torch.no_grad():  # a new student after every step
                for p in student.parameters():
                    p.copy_(torch.from_numpy(rng.normal(size=p.shape)))
            history.append(student.weight.detach().numpy().copy())
            ref_step.update_ema(student, teacher, k)
            ema = update(ema, {"w": jnp.asarray(student.weight.detach().numpy()),
                               "b": jnp.asarray(student.bias.detach().numpy())}, jnp.asarray(k, jnp.int32))
            np.testing.assert_allclose(np.asarray(ema["w"]), teacher.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(ema["b"]), teacher.bias.detach().numpy(), rtol=1e-12, atol=1e-14)
            if k == 0:
                np.testing.assert_array_equal(np.asarray(ema["w"]), history[0])
            if k == 99:
                np.testing.assert_allclose(np.asarray(ema["w"]), np.mean(history, axis=0), rtol=1e-10)
    assert float(v2_state.ema_ratio(249)) == pytest.approx(0.996, abs=1e-7)
    assert float(v2_state.ema_ratio(10_000)) == pytest.approx(0.996, abs=1e-7)
    assert float(v2_state.ema_ratio(248)) < 0.996 - 1e-6


def test_settings_are_checked():
    with pytest.raises(ValueError, match="positive"):
        v2_state.OptimizerSettingsV2(lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        v2_state.OptimizerSettingsV2(betas=(0.9, 1.0))

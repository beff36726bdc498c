"""UniMatch's optimiser: our optax chain against ``torch.optim.SGD`` (momentum 0.9, weight decay added to the
gradient) with UniMatch's poly rule applied after every step and the head at 10x, over many steps, in fp64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch

from zsp_jax.references import unimatch_step
from zsp_jax.train import state as state_lib

LR, MULTI, TOTAL, STEPS = 0.01, 10.0, 12, 12


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 3)


def _config(weight_decay=1e-4, momentum=0.9):
    return ml_collections.ConfigDict({"train": {"lr": LR, "head_lr_multiplier": MULTI, "momentum": momentum,
                                                "weight_decay": weight_decay, "lr_power": 0.9}})


def _as_tree(net: _Net) -> dict:
    return {name: {"kernel": jnp.asarray(getattr(net, name).weight.detach().numpy().T),
                   "bias": jnp.asarray(getattr(net, name).bias.detach().numpy())} for name in ("backbone", "head")}


def test_sgd_momentum_weight_decay_poly_and_head_multiplier_match_torch():
    torch.manual_seed(0)
    net = _Net().double()
    rng = np.random.default_rng(0)
    grads = [{n: {"kernel": rng.normal(size=(getattr(net, n).in_features, getattr(net, n).out_features)),
                  "bias": rng.normal(size=getattr(net, n).out_features)} for n in ("backbone", "head")}
             for _ in range(STEPS)]
    opt = unimatch_step.make_optimizer(net, LR, MULTI)
    torch_lrs = []
    for i, g in enumerate(grads):
        torch_lrs.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        for n in ("backbone", "head"):
            layer = getattr(net, n)
            layer.weight.grad = torch.from_numpy(g[n]["kernel"].T.copy())
            layer.bias.grad = torch.from_numpy(g[n]["bias"].copy())
        opt.step()
        unimatch_step.set_poly_lr(opt, LR, MULTI, i, TOTAL)

    with jax.enable_x64(True):
        torch.manual_seed(0)
        params = _as_tree(_Net().double())
        tx, schedule = state_lib.make_optimizer(_config(), params, TOTAL)
        opt_state = tx.init(params)
        for i, g in enumerate(grads):
            # The rate of step i (what the train step logs as "lr"), backbone and head.
            assert abs(float(schedule(i)) - torch_lrs[i][0]) < 1e-15 * LR
            updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, params)
            params = optax.apply_updates(params, updates)
        ours = jax.tree.map(np.asarray, params)
    for n in ("backbone", "head"):
        layer = getattr(net, n)
        np.testing.assert_allclose(ours[n]["kernel"], layer.weight.detach().numpy().T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours[n]["bias"], layer.bias.detach().numpy(), rtol=1e-12, atol=1e-14)
    # The comparison has something to compare: the rate fell, the head moved 10x as fast at the start.
    assert torch_lrs[-1][0] < 0.3 * LR and torch_lrs[0] == (LR, LR * MULTI)


def test_the_groups_are_the_backbone_and_everything_else():
    """A model's parameter tree: ``backbone.*`` at the base rate, ASPP / decoder / classifier at 10x."""
    from flax import nnx

    from zsp_jax.models.deeplab import DeepLabConfig, DeepLabV3Plus, param_group_labels

    abstract = nnx.eval_shape(lambda: DeepLabV3Plus(DeepLabConfig.tiny_resnet(num_classes=3), rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    labels = {".".join(str(getattr(k, "key", k)) for k in path): v
              for path, v in jax.tree_util.tree_leaves_with_path(param_group_labels(params))}
    assert {k.split(".")[0] for k in labels} == {"backbone", "aspp", "reduce", "fuse", "classifier"}
    for k, v in labels.items():
        assert v == ("backbone" if k.startswith("backbone.") else "head"), (k, v)

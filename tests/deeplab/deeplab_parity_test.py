"""DeepLabV3+ against the PyTorch reference with UniMatch's architecture and parameter names.

Real widths (ResNet-50/101 deep stem, ResNet-50 torchvision stem, Xception-65) on small inputs:
* eval-mode logits in fp32 (relative error <= 1e-4);
* one train-mode forward with the feature perturbation (shared dropout masks) in fp64: both
  decodes and every updated running statistic. fp64 because train-mode BatchNorm over a
  small batch is ill-conditioned: PyTorch's own fp32 result differs from its fp64 result by
  ~7e-4 (ResNet-101, 2x65x65), so an fp32 comparison could only test that loosely, while in
  fp64 any semantic difference (unbiased variance, statistics over the concatenated
  clean/perturbed batch, momentum) shows far above 1e-9.
Tiny widths at 321x321 (every ASPP rate reaches real pixels), output stride 8 and UniMatch's
Cityscapes geometry (multi-grid) add fp32 train-mode checks and fp64 gradients.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.models.deeplab import DeepLabConfig
from zsp_jax.models.deeplab.convert import convert
from zsp_jax.references.deeplab import (batch_stats_by_torch_key, nchw_to_nhwc, ours_from_torch,
                                            random_fp_masks, torch_reference)
from zsp_jax.utils.bench import relative_error

REAL = {
    "resnet50_deep": DeepLabConfig.resnet50(),
    "resnet101_deep": DeepLabConfig.resnet101(),
    "resnet50_plain": DeepLabConfig.resnet50(stem="plain"),
    "xception65": DeepLabConfig.xception65(num_classes=81),
}
TINY = {
    "tiny_resnet_deep_os16": (DeepLabConfig.tiny_resnet(), 321),
    "tiny_resnet_plain_os8": (DeepLabConfig.tiny_resnet(resnet_stem="plain", output_stride=8), 161),
    "tiny_xception_os16": (DeepLabConfig.tiny_xception(), 321),
    "tiny_xception_os8": (DeepLabConfig.tiny_xception(output_stride=8), 161),
    # UniMatch's Cityscapes geometry: output stride 8, multi-grid (stage-4 dilations 4, 8, 16), ASPP 12/24/36
    "tiny_resnet_deep_os8_multigrid": (DeepLabConfig.tiny_resnet(resnet_blocks=(1, 1, 2, 3), resnet_multi_grid=True,
                                                                 output_stride=8, aspp_rates=(12, 24, 36)), 161),
}
FP32_TOL = 1e-4
FP64_TOL = 1e-9


def _input(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32))


def _eval_logits(config, ref, ours, x):
    with torch.no_grad():
        r = nchw_to_nhwc(ref.eval()(x))
    o = nnx.jit(lambda m, a: m(a, train=False))(ours, jnp.asarray(nchw_to_nhwc(x)))
    return np.asarray(o), r


def _train_fp_step(config, ref, ours, x, masks):
    """One train-mode forward with shared masks on both sides; returns ((ours, ours_fp), (ref, ref_fp))."""
    with torch.no_grad():
        r = ref.train()(x, need_fp=True, fp_masks=tuple(torch.from_numpy(m) for m in masks))
    fn = nnx.jit(lambda m, a, m1, m4: m(a, train=True, need_fp=True, fp_masks=(m1, m4)))
    o = fn(ours, jnp.asarray(nchw_to_nhwc(x)), *(jnp.asarray(m) for m in masks))
    return tuple(np.asarray(v) for v in o), tuple(nchw_to_nhwc(v) for v in r)


def _assert_stats_equal(config, ref, ours, tol):
    ref_state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours_stats = batch_stats_by_torch_key(ours, config, ref_state)
    assert len(ours_stats) > 0
    errors = {k: relative_error(ours_stats[k], ref_state[k]) for k in ours_stats}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3g}"
    return errors[worst]


# ----------------------------------------------------------------------------- real widths


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    config = REAL[request.param]
    ref = torch_reference(config, seed=1)
    return config, ref, ours_from_torch(config, ref)


@pytest.mark.full_size
def test_eval_logits_fp32(real):
    config, ref, ours = real
    o, r = _eval_logits(config, ref, ours, _input(2, 97))
    assert o.shape == (2, 97, 97, config.num_classes)
    assert relative_error(o, r) <= FP32_TOL


@pytest.mark.full_size
def test_train_step_with_feature_perturbation_fp64(real):
    config, ref32, _ = real
    ref = copy.deepcopy(ref32).double()
    masks = random_fp_masks(config, 2, seed=3, dtype=np.float64)
    with jax.enable_x64(True):
        ours = ours_from_torch(config, ref32, param_dtype=jnp.float64)
        (o, o_fp), (r, r_fp) = _train_fp_step(config, ref, ours, _input(2, 65).double(), masks)
        assert o.dtype == np.float64
        assert relative_error(o, r) <= FP64_TOL
        assert relative_error(o_fp, r_fp) <= FP64_TOL
        assert relative_error(o, o_fp) > 1e-3  # the perturbation changed something
        _assert_stats_equal(config, ref, ours, FP64_TOL)


# ----------------------------------------------------------------------------- tiny widths, full geometry


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    config, size = TINY[request.param]
    ref = torch_reference(config, seed=2)
    return config, size, ref, ours_from_torch(config, ref)


def test_tiny_eval_logits_fp32(tiny):
    config, size, ref, ours = tiny
    o, r = _eval_logits(config, ref, ours, _input(2, size, seed=1))
    assert relative_error(o, r) <= 1e-5


def test_tiny_train_step_fp32(tiny):
    config, size, ref32, _ = tiny
    ref = copy.deepcopy(ref32)
    ours = ours_from_torch(config, ref32)
    masks = random_fp_masks(config, 2, seed=4)
    (o, o_fp), (r, r_fp) = _train_fp_step(config, ref, ours, _input(2, size, seed=2), masks)
    assert relative_error(o, r) <= FP32_TOL
    assert relative_error(o_fp, r_fp) <= FP32_TOL
    _assert_stats_equal(config, ref, ours, FP32_TOL)


@pytest.mark.parametrize("name", ["tiny_resnet_deep_os16", "tiny_xception_os16"])
def test_tiny_gradients_fp64(name):
    """d(loss)/d(params) of a train-mode step with the perturbation, loss = <logits, g> + <logits_fp, g_fp>."""
    config, _ = TINY[name]
    ref32 = torch_reference(config, seed=2)
    size = 97
    ref = copy.deepcopy(ref32).double().train()
    masks = random_fp_masks(config, 2, seed=5, dtype=np.float64)
    x = _input(2, size, seed=3).double()
    rng = np.random.default_rng(6)
    g, g_fp = (rng.normal(size=(2, size, size, config.num_classes)) for _ in range(2))
    r, r_fp = ref(x, need_fp=True, fp_masks=tuple(torch.from_numpy(m) for m in masks))
    loss = ((r.permute(0, 2, 3, 1) * torch.from_numpy(g)).sum()
            + (r_fp.permute(0, 2, 3, 1) * torch.from_numpy(g_fp)).sum())
    loss.backward()
    ref_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in ref.named_parameters()}
    ref_grads.update({k: b for k, b in ref.named_buffers()})
    expected, _ = convert(ref_grads, config, source_name="reference grads")
    with jax.enable_x64(True):
        ours = ours_from_torch(config, ref32, param_dtype=jnp.float64)

        def loss_fn(model, a, m1, m4, ga, gb):
            o, o_fp = model(a, train=True, need_fp=True, fp_masks=(m1, m4))
            return jnp.sum(o * ga) + jnp.sum(o_fp * gb)

        grads = nnx.jit(nnx.grad(loss_fn))(ours, jnp.asarray(nchw_to_nhwc(x)), *(jnp.asarray(m) for m in masks),
                                           jnp.asarray(g), jnp.asarray(g_fp))
        flat = {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert set(flat) == {k for k in expected if not (k.endswith(".mean") or k.endswith(".var"))}
    # The converter stores fp32, so compare at fp32 resolution, per tensor against the largest
    # gradient: some gradients are exactly zero in theory (the bias of a BN followed by a 1x1
    # conv and a train-mode BN) and only rounding noise in both frameworks.
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    for k, v in flat.items():
        err = float(np.max(np.abs(v - expected[k])))
        assert err <= 1e-6 * max(float(np.max(np.abs(expected[k]))), 1e-3 * scale), k

"""DeepLabV3+ API: configs, shapes, train/eval state, feature perturbation randomness, parameter groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from zsp_jax.models.deeplab import (BACKBONE_PARAMS, HEAD_PARAMS, DeepLabConfig, DeepLabV3Plus,
                                    param_group_labels)
from zsp_jax.models.deeplab.convert import model_shapes
from zsp_jax.models.deeplab.layers import ChannelDropout
from zsp_jax.references.deeplab import nchw_to_nhwc, ours_from_torch, random_model, torch_reference
from zsp_jax.utils.bench import relative_error


def _n_params(config):
    return sum(int(np.prod(s.shape)) for k, s in model_shapes(config).items()
               if not (k.endswith(".mean") or k.endswith(".var")))


@pytest.mark.full_size
def test_real_configs_have_unimatch_sizes():
    # UniMatch's logs: 59.5M parameters (ResNet-101, 21 classes), 54.7M (Xception-65, 81 classes)
    assert round(_n_params(DeepLabConfig.resnet101()) / 1e6, 1) == 59.5
    assert round(_n_params(DeepLabConfig.xception65(num_classes=81)) / 1e6, 1) == 54.7
    assert DeepLabConfig.resnet50(stem="plain").variant == "resnet50_plain"
    assert DeepLabConfig.resnet101().variant == "resnet101_deep"


def test_config_json_round_trip_and_validation():
    c = DeepLabConfig.xception65(num_classes=81, output_stride=8)
    assert DeepLabConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabConfig.xception65(output_stride=32)
    with pytest.raises(ValueError, match="resnet_stem"):
        DeepLabConfig.resnet50(stem="v1d")


@pytest.mark.parametrize("os_,multi_grid,expected", [(16, False, (1, 2, 2)), (8, False, (2, 4, 4)),
                                                     (16, True, (2, 4, 8)), (8, True, (4, 8, 16))])
def test_stage4_dilations(os_, multi_grid, expected):
    """UniMatch's _make_layer: the first block keeps the previous dilation, multi-grid scales by (2, 2, 4)."""
    config = DeepLabConfig.tiny_resnet(resnet_blocks=(1, 1, 1, 3), output_stride=os_, resnet_multi_grid=multi_grid)
    model = nnx.eval_shape(lambda: DeepLabV3Plus(config, rngs=nnx.Rngs(0)))
    assert tuple(b.conv2.dilation for b in model.backbone.layer4) == expected
    assert tuple(b.conv2.stride for b in model.backbone.layer4) == (1, 1, 1)


def test_multi_grid_validation():
    assert DeepLabConfig.cityscapes().resnet_multi_grid and DeepLabConfig.cityscapes().output_stride == 8
    with pytest.raises(ValueError, match="stage 4"):
        DeepLabConfig.tiny_resnet(resnet_multi_grid=True)  # tiny has 1 block in stage 4
    with pytest.raises(ValueError, match="ResNet backbones only"):
        DeepLabConfig.xception65(resnet_multi_grid=True)


@pytest.mark.parametrize("config", [DeepLabConfig.tiny_resnet(), DeepLabConfig.tiny_xception()], ids=["resnet", "x"])
def test_non_square_input_matches_reference(config):
    """Odd, non-square sizes: PyTorch's floor arithmetic for strided layers and the final resize."""
    ref = torch_reference(config, seed=11)
    ours = ours_from_torch(config, ref)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 75, 50)).astype(np.float32))
    with torch.no_grad():
        expected = nchw_to_nhwc(ref(x))
    out = nnx.jit(lambda m, a: m(a, train=False))(ours, jnp.asarray(nchw_to_nhwc(x)))
    c1, c4 = nnx.jit(lambda m, a: m.features(a, train=False))(ours, jnp.asarray(nchw_to_nhwc(x)))
    assert out.shape == (1, 75, 50, config.num_classes)
    assert c1.shape[1:3] == (19, 13) and c4.shape[1:3] == (5, 4)
    assert relative_error(out, expected) <= 1e-5


@pytest.fixture(scope="module")
def tiny():
    return random_model(DeepLabConfig.tiny_resnet(), seed=0)


def _stats(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def test_eval_keeps_and_train_updates_running_statistics(tiny):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 33, 33, 3)), jnp.float32)
    before = _stats(tiny)
    nnx.jit(lambda m, a: m(a, train=False))(tiny, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, _stats(tiny)))
    model = nnx.clone(tiny)
    nnx.jit(lambda m, a: m(a, train=True))(model, x)
    assert all(not np.array_equal(a, b) for a, b in zip(before, _stats(model)))


def test_feature_perturbation_draws_from_the_dropout_stream(tiny):
    model = nnx.clone(tiny)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 33, 33, 3)), jnp.float32)
    f = nnx.jit(lambda m, a: m(a, train=False, need_fp=True))
    clean1, fp1 = f(model, x)
    clean2, fp2 = f(model, x)
    assert np.allclose(clean1, clean2)  # eval mode: the clean half does not depend on the masks
    assert not np.allclose(fp1, fp2)  # the stream advanced: new masks
    assert relative_error(clean1, nnx.jit(lambda m, a: m(a, train=False))(model, x)) <= 1e-5
    key = jax.random.key(5)
    g = nnx.jit(lambda m, a, k: m(a, train=False, need_fp=True, rngs=k))
    np.testing.assert_array_equal(g(model, x, key)[1], g(model, x, key)[1])  # an explicit key is reproducible


def test_channel_dropout_is_per_sample_and_channel():
    drop = ChannelDropout(0.5, rngs=nnx.Rngs(dropout=0))
    keep = drop.sample_mask(64, 256)
    assert keep.shape == (64, 256) and keep.dtype == jnp.bool_
    assert 0.45 < float(keep.mean()) < 0.55
    x = jnp.asarray(np.random.default_rng(3).uniform(1, 2, size=(64, 5, 5, 256)), jnp.float32)
    y = np.asarray(drop(x, keep))
    np.testing.assert_allclose(y, np.asarray(x) * 2.0 * np.asarray(keep)[:, None, None, :])
    with pytest.raises(ValueError, match="randomness"):
        ChannelDropout(0.5, rngs=None).sample_mask(2, 3)


def test_parameter_groups_for_the_head_learning_rate(tiny):
    params = nnx.state(tiny, nnx.Param)
    backbone, head = nnx.state(tiny, BACKBONE_PARAMS), nnx.state(tiny, HEAD_PARAMS)
    n = lambda s: len(jax.tree.leaves(s))  # noqa: E731
    assert n(backbone) + n(head) == n(params) and n(backbone) > 0
    assert n(head) == 3 * (6 + 1 + 2) + 2  # ConvBNs (3 tensors each): ASPP 6, reduce 1, fuse 2; classifier 2
    labels = param_group_labels(params)
    assert sorted(set(jax.tree.leaves(labels))) == ["backbone", "head"]
    assert jax.tree.leaves(labels).count("backbone") == n(backbone)
    # UniMatch: SGD with the head at 10x the backbone's learning rate
    tx = optax.multi_transform({"backbone": optax.sgd(1e-3), "head": optax.sgd(1e-2)}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = {jax.tree_util.keystr(p): float(np.asarray(v).ravel()[0])
            for p, v in jax.tree_util.tree_leaves_with_path(updates)}
    assert any(k.startswith("['backbone']") for k in flat)
    assert all(v == pytest.approx(-1e-3) for k, v in flat.items() if k.startswith("['backbone']"))
    assert all(v == pytest.approx(-1e-2) for k, v in flat.items() if not k.startswith("['backbone']"))

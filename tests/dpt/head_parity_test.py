"""The DPT head against UniMatch V2's (re-stated in ``zsp_jax.references.unimatch_v2_model``), every
reference tensor randomised, weights moved by the converter's head rules.

Widths: a tiny head and V2's real small head (embed 384; the base head, embed 768, end to end);
patch grids 7x9 and 9x7 (non-square, odd: the stride-2 conv rounds up, the 4x / 2x transposed
convs and the align-corners resizes see different sizes per axis). Checked: each piece
(projection + resize per level, every refinenet, the output conv), the whole head in fp32 and
fp64, and the gradients of every head parameter and of the input features on a small case.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.dpt.helpers import (HEAD_CONFIGS, flat_grads, head_from_torch, nchw_to_nhwc, nhwc_to_nchw, random_tokens,
                               torch_head)
from zsp_jax.models.dpt.convert import convert_head
from zsp_jax.models.dpt.head import TileConvTranspose
from zsp_jax.utils.bench import relative_error
from zsp_jax.utils.weights import conv_transpose2d

GRIDS = [(7, 9), (9, 7)]
FP32_TOL = 1e-4
FP64_TOL = 1e-10


@pytest.fixture(scope="module", params=["tiny", "small"])
def heads(request):
    config = HEAD_CONFIGS[request.param]
    ref = torch_head(config, seed=1)
    return config, ref, head_from_torch(config, ref)


def _torch_tokens(tokens):
    return [torch.from_numpy(t) for t in tokens]


@pytest.mark.parametrize("grid", GRIDS)
def test_reassemble_per_level(heads, grid):
    """projects[i] + resize_layers[i] (4x4/4 and 2x2/2 transposed convs, identity, 3x3/2 conv)."""
    config, ref, ours = heads
    tokens = random_tokens(2, grid, config.embed_dim, seed=2)
    got = nnx.jit(lambda m, t: m.reassemble(t, grid))(ours, [jnp.asarray(t) for t in tokens])
    h, w = grid
    expected_sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), ((h + 1) // 2, (w + 1) // 2)]
    with torch.no_grad():
        for i, t in enumerate(_torch_tokens(tokens)):
            x = t.permute(0, 2, 1).reshape(2, config.embed_dim, h, w)
            r = nchw_to_nhwc(ref.resize_layers[i](ref.projects[i](x)))
            assert got[i].shape == r.shape == (2, *expected_sizes[i], config.out_channels[i])
            assert relative_error(got[i], r) <= FP32_TOL, i


def test_tile_conv_transpose_layout_is_nnx_conv_transpose():
    """The stored kernel is nnx.ConvTranspose's: loaded into one, it computes the same map, and both
    equal torch's ConvTranspose2d through ``weights.conv_transpose2d``."""
    rng = np.random.default_rng(0)
    for scale in (2, 4):
        torch_layer = torch.nn.ConvTranspose2d(3, 5, scale, stride=scale)
        torch_layer.weight.data = torch.from_numpy(rng.normal(size=(3, 5, scale, scale)).astype(np.float32))
        torch_layer.bias.data = torch.from_numpy(rng.normal(size=(5,)).astype(np.float32))
        x = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
        with torch.no_grad():
            expected = nchw_to_nhwc(torch_layer(torch.from_numpy(x)))
        kernel = conv_transpose2d(torch_layer.weight.detach().numpy())
        ours = TileConvTranspose(3, 5, scale, rngs=nnx.Rngs(0))
        ours.kernel.set_value(jnp.asarray(kernel))
        ours.bias.set_value(jnp.asarray(torch_layer.bias.detach().numpy()))
        flax_layer = nnx.ConvTranspose(3, 5, (scale, scale), strides=(scale, scale), padding="VALID",
                                       rngs=nnx.Rngs(0))
        flax_layer.kernel.set_value(jnp.asarray(kernel))
        flax_layer.bias.set_value(jnp.asarray(torch_layer.bias.detach().numpy()))
        x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
        assert relative_error(ours(x_nhwc), expected) <= 1e-6
        assert relative_error(flax_layer(x_nhwc), expected) <= 1e-6


@pytest.mark.parametrize("grid", GRIDS)
def test_refinenets(heads, grid):
    """Each fusion block on random inputs: refinenet4 (one input, resized to the next level),
    refinenet3/2 (with skip, resized to the next level), refinenet1 (with skip, x2)."""
    config, ref, ours = heads
    h, w = grid
    f = config.features
    rng = np.random.default_rng(3)
    cases = [  # (index, path size, output size or None for x2)
        (3, ((h + 1) // 2, (w + 1) // 2), (h, w)),
        (2, (h, w), (2 * h, 2 * w)),
        (1, (2 * h, 2 * w), (4 * h, 4 * w)),
        (0, (4 * h, 4 * w), None),
    ]
    for index, size, out_size in cases:
        path = rng.normal(size=(2, *size, f)).astype(np.float32)
        skip = None if index == 3 else rng.normal(size=(2, *size, f)).astype(np.float32)
        block = getattr(ref.scratch, f"refinenet{index + 1}")
        inputs = [nhwc_to_nchw(path)] + ([] if skip is None else [nhwc_to_nchw(skip)])
        with torch.no_grad():
            r = nchw_to_nhwc(block(*inputs, size=out_size))
        o = ours.refine[index](jnp.asarray(path), None if skip is None else jnp.asarray(skip), size=out_size)
        expected = out_size if out_size is not None else (2 * size[0], 2 * size[1])
        assert o.shape == r.shape == (2, *expected, f)
        assert relative_error(o, r) <= FP32_TOL, index


def test_output_conv(heads):
    config, ref, ours = heads
    x = np.random.default_rng(4).normal(size=(2, 11, 13, config.features)).astype(np.float32)
    with torch.no_grad():
        r = nchw_to_nhwc(ref.scratch.output_conv(nhwc_to_nchw(x)))
    o = ours.output(jnp.asarray(x))
    assert o.shape == (2, 11, 13, config.num_classes)
    assert relative_error(o, r) <= FP32_TOL


@pytest.mark.parametrize("grid", GRIDS)
def test_whole_head_fp32(heads, grid):
    config, ref, ours = heads
    tokens = random_tokens(2, grid, config.embed_dim, seed=5)
    with torch.no_grad():
        r = nchw_to_nhwc(ref(_torch_tokens(tokens), *grid))
    o = nnx.jit(lambda m, t: m(t, grid))(ours, [jnp.asarray(t) for t in tokens])
    assert o.shape == r.shape == (2, 8 * grid[0], 8 * grid[1], config.num_classes)
    assert o.dtype == jnp.float32
    assert relative_error(o, r) <= FP32_TOL


def test_whole_head_base_width_fp32():
    """V2's base head (embed 768, features 128, out_channels 96/192/384/768), 19 classes."""
    config = HEAD_CONFIGS["base"]
    ref = torch_head(config, seed=11)
    ours = head_from_torch(config, ref)
    grid = (9, 7)
    tokens = random_tokens(2, grid, config.embed_dim, seed=12)
    with torch.no_grad():
        r = nchw_to_nhwc(ref(_torch_tokens(tokens), *grid))
    o = nnx.jit(lambda m, t: m(t, grid))(ours, [jnp.asarray(t) for t in tokens])
    assert o.shape == r.shape == (2, 72, 56, 19)
    assert relative_error(o, r) <= FP32_TOL


@pytest.mark.parametrize("grid", GRIDS)
def test_whole_head_fp64(heads, grid):
    """fp64 on both sides (the fp32 weights are exact in fp64): any semantic difference shows far above 1e-10."""
    config, ref32, _ = heads
    ref = copy.deepcopy(ref32).double()
    tokens = random_tokens(2, grid, config.embed_dim, seed=6, dtype=np.float64)
    with torch.no_grad():
        r = nchw_to_nhwc(ref(_torch_tokens(tokens), *grid))
    with jax.enable_x64(True):
        ours = head_from_torch(config, ref32, param_dtype=jnp.float64)
        o = nnx.jit(lambda m, t: m(t, grid))(ours, [jnp.asarray(t) for t in tokens])
        assert o.dtype == jnp.float64
        o = np.asarray(o)
    assert relative_error(o, r) <= FP64_TOL


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_head_gradients_fp32(name):
    """d(sum(logits * g))/d(every head parameter) and d/d(input features), fp32, on a 7x9 grid."""
    config = HEAD_CONFIGS[name]
    grid = (7, 9)
    ref = torch_head(config, seed=7).train()
    ours = head_from_torch(config, ref)
    tokens = random_tokens(2, grid, config.embed_dim, seed=8)
    g = np.random.default_rng(9).normal(size=(2, 8 * grid[0], 8 * grid[1], config.num_classes)).astype(np.float32)

    torch_tokens = [torch.from_numpy(t).requires_grad_(True) for t in tokens]
    out = ref(torch_tokens, *grid)
    (out.permute(0, 2, 3, 1) * torch.from_numpy(g)).sum().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    # refinenet4.resConfUnit1 never runs in V2: no gradient, and no parameter of ours
    assert {k for k, p in ref.named_parameters() if p.grad is None} == {
        f"scratch.refinenet4.resConfUnit1.conv{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    expected, _ = convert_head(ref_grads, config, src="", dst="", source_name="reference grads")

    def loss_fn(model, feats, weights):
        return jnp.sum(model(feats, grid) * weights)

    param_grads, feature_grads = nnx.jit(nnx.grad(loss_fn, argnums=(0, 1)))(
        ours, [jnp.asarray(t) for t in tokens], jnp.asarray(g))
    got = flat_grads(param_grads)
    assert set(got) == set(expected)
    for key, value in got.items():
        assert relative_error(value, expected[key]) <= FP32_TOL, (key, relative_error(value, expected[key]))
    for level, (ours_grad, t) in enumerate(zip(feature_grads, torch_tokens)):
        assert relative_error(ours_grad, t.grad.numpy()) <= FP32_TOL, level

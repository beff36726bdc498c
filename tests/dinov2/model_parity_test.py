"""Dinov2 against transformers' Dinov2Model / Dinov2WithRegistersModel with every tensor randomised,
their positional-embedding resampling patched to DINOv2's rule (``zsp_jax.references.dinov2``).

Per block (each block fed the reference's input) and end to end (embeddings, every block's
output, the final-normed features and DINOv2's ``get_intermediate_layers`` at the configured
indices), fp32, relative error <= 1e-4, at two non-square sizes that are not 518 and at 518 x 518
(the size where DINOv2 keeps the embedding as it is).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.models.dinov2 import Dinov2, Dinov2Config, convert_state_dict
from zsp_jax.references import dinov2 as ref_lib
from zsp_jax.utils.bench import relative_error

TOL = 1e-4
# UniMatch V2's encoder (no registers, offset 0.1, plain bicubic), the registers checkpoints' rule (offset 0,
# antialias), ViT-g's SwiGLU, and registers under V2's rule (the scale-factor path with registers).
CASES = {
    "mlp": Dinov2Config.tiny(),
    "registers": Dinov2Config.tiny(registers=4),
    "swiglu": Dinov2Config.tiny(ffn="swiglu"),
    "registers_offset": Dinov2Config.tiny(registers=2, interpolate_offset=0.1, interpolate_antialias=False),
}
# The two sizes that matter for the resampling rule (non-square, not 518, and 518 x 518) for V2's encoder and the
# registers rule; the SwiGLU FFN and registers under the 0.1 rule at one size each (they do not depend on the size).
SIZES = [(98, 126), (126, 98), (518, 518)]
CASE_SIZES = ([("mlp", s) for s in SIZES] + [("registers", s) for s in SIZES]
              + [("swiglu", (98, 126)), ("registers_offset", (126, 98))])


def _images(size, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *size, 3)).astype(np.float32)


_PAIRS: dict = {}


def _pair(case):
    """(config, transformers reference with DINOv2's resampling, our model with the same weights), built once."""
    if case not in _PAIRS:
        config = CASES[case]
        reference = ref_lib.hf_model(config, seed=1)
        ours = convert_state_dict(ref_lib.official_state_dict(reference), "official", variant=config).build()
        _PAIRS[case] = config, reference, ours
    return _PAIRS[case]


def _everything(model, images):
    """One jitted program per size: every public forward method at once."""
    depth = model.config.depth
    return model.embed(images), model.block_outputs(images, range(depth)), model(images), model.intermediate_layers(images)


@pytest.mark.parametrize("case,size", CASE_SIZES, ids=[f"{c}-{s[0]}x{s[1]}" for c, s in CASE_SIZES])
def test_end_to_end(case, size):
    config, reference, model = _pair(case)
    images = _images(size)
    states = ref_lib.hidden_states(reference, images)
    embedded, blocks, features, levels = jax.jit(_everything)(model, jnp.asarray(images))
    assert relative_error(embedded, states[0]) <= TOL
    errors = [relative_error(ours, theirs) for ours, theirs in zip(blocks, states[1:])]
    assert len(errors) == config.depth and max(errors) <= TOL, errors

    with torch.no_grad():
        final = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    r = config.num_register_tokens
    assert relative_error(features.cls_token, final[:, 0]) <= TOL
    assert relative_error(features.patch_tokens, final[:, 1 + r:]) <= TOL
    assert features.register_tokens.shape == (2, r, config.embed_dim)
    if r:
        assert relative_error(features.register_tokens, final[:, 1:1 + r]) <= TOL
    assert relative_error(features.prenorm, states[-1]) <= TOL

    # what UniMatch V2's dpt.py calls: get_intermediate_layers(x, indices) -> normed patch tokens
    backbone = ref_lib.Dinov2Backbone(reference)
    with torch.no_grad():
        expected = backbone.get_intermediate_layers(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                                    list(config.intermediate_indices))
    grid = (size[0] // 14) * (size[1] // 14)
    assert [tuple(level.shape) for level in levels] == [(2, grid, config.embed_dim)] * len(expected)
    assert max(relative_error(a, b.numpy()) for a, b in zip(levels, expected)) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_per_block(case):
    """Each block on the reference's own input: no error carried over from earlier blocks."""
    _, reference, model = _pair(case)
    images = _images((98, 126), seed=1)
    states = ref_lib.hidden_states(reference, images)
    for i, block in enumerate(model.blocks):
        assert relative_error(block(jnp.asarray(states[i])), states[i + 1]) <= TOL, i
    assert relative_error(model.norm(jnp.asarray(states[-1])), reference.layernorm(torch.from_numpy(states[-1]))
                          .detach().numpy()) <= TOL


@pytest.mark.parametrize("size", [(98, 126), (126, 98), (252, 700), (1022, 1022)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rule", [(0.1, False), (0.0, True), (0.0, False), (0.1, True)], ids=str)
def test_positional_embedding_rule(size, rule):
    """Our resampled embedding equals DINOv2's interpolate_pos_encoding (torch) for every offset / antialias
    combination, down (7 x 9) and up (73 x 73) from the 37 x 37 grid."""
    offset, antialias = rule
    config = Dinov2Config.tiny(interpolate_offset=offset, interpolate_antialias=antialias)
    model = Dinov2(config, rngs=nnx.Rngs(2))  # a random (truncated normal) embedding, nothing else is used
    pos = torch.from_numpy(np.array(model.pos_embed.get_value()))
    grid = (size[0] // 14) * (size[1] // 14)
    expected = ref_lib.dinov2_interpolate_pos_encoding(pos, 1 + grid, *size, patch_size=14, offset=offset,
                                                       antialias=antialias)[0].numpy()
    ours = model.positional_embedding(*size)
    assert ours.shape == expected.shape == (1 + grid, config.embed_dim)
    assert relative_error(ours, expected) <= 1e-5


@pytest.mark.parametrize("size", [(98, 126), (126, 98)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov2_rule_differs_from_transformers(size):
    """Proof that the tests check DINOv2's rule: transformers' own Dinov2Model resamples differently at these sizes
    (and identically at 518 x 518); its registers model already resamples as DINOv2's registers checkpoints."""
    images, square = _images(size, batch=1), _images((518, 518), batch=1)

    def embeddings(model, pixels):
        return model.embeddings(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).detach().numpy()

    config = Dinov2Config.tiny()
    model = ref_lib.hf_model(config, seed=3, dinov2_interpolation=False)
    theirs, theirs_square = embeddings(model, images), embeddings(model, square)
    ref_lib.patch_interpolation(model, offset=config.interpolate_offset, antialias=config.interpolate_antialias)
    assert relative_error(theirs, embeddings(model, images)) > 1e-2
    assert relative_error(theirs_square, embeddings(model, square)) == 0

    registers = Dinov2Config.tiny(registers=4)
    model = ref_lib.hf_model(registers, seed=3, dinov2_interpolation=False)
    theirs = embeddings(model, images)
    ref_lib.patch_interpolation(model, offset=registers.interpolate_offset, antialias=registers.interpolate_antialias)
    assert relative_error(theirs, embeddings(model, images)) <= 1e-6


@pytest.mark.full_size
def test_vit_s14_full_size():
    """The real ViT-S/14 shapes (6 heads of 64, 12 blocks, V2's indices 2, 5, 8, 11) at 224 x 168."""
    config = Dinov2Config.vit_s14()
    reference = ref_lib.hf_model(config, seed=4)
    model = convert_state_dict(ref_lib.official_state_dict(reference), "official").build()
    assert model.config == config
    images = _images((224, 168), batch=1, seed=4)
    levels = jax.jit(lambda m, v: m.intermediate_layers(v))(model, jnp.asarray(images))
    with torch.no_grad():
        expected = ref_lib.Dinov2Backbone(reference).get_intermediate_layers(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), [2, 5, 8, 11])
    assert max(relative_error(a, b.numpy()) for a, b in zip(levels, expected)) <= TOL

"""Parity of every SAM component with segment-anything, on a tiny randomised config (fp32, rel. error <= 1e-4).

The reference modules are segment-anything's own classes built with the tiny config's numbers
and every tensor randomised (its init leaves the relative-position tables at zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from zsp_jax.models.sam import SamConfig, postprocess_masks, preprocess
from zsp_jax.models.sam.image_encoder import EncoderBlock, chunk_plan
from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error

TOL = 1e-4


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tokens(tiny_config):
    """Random (2, g, g, D) encoder tokens."""
    g, d = tiny_config.grid_size, tiny_config.encoder_dim
    return np.random.default_rng(1).normal(size=(2, g, g, d)).astype(np.float32)


def test_patch_embedding(tiny_config, tiny_pair):
    ref, ours = tiny_pair
    x = np.random.default_rng(0).normal(size=(2, tiny_config.image_size, tiny_config.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        want = (ref.image_encoder.patch_embed(nchw(x)) + ref.image_encoder.pos_embed).numpy()
    enc = ours.image_encoder
    got = enc.patch_embed(jnp.asarray(x)) + enc.pos_embed.get_value()
    assert got.shape == want.shape
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
def test_encoder_block(tiny_config, tiny_pair, tokens, index):
    ref, ours = tiny_pair
    assert (index in tiny_config.global_attn_indexes) == (index == 1)
    with torch.no_grad():
        want = ref.image_encoder.blocks[index](torch.from_numpy(tokens)).numpy()
    got = ours.image_encoder.blocks[index](jnp.asarray(tokens))
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("budget", [0, 2**18, 2**16, 2**15], ids=["unchunked", "4-rows", "1-row", "1-row-1-head"])
def test_global_attention_chunking_is_exact(tiny_config, tiny_pair, tokens, budget):
    """The blocked global attention (the CPU default) and the unchunked form agree with the reference."""
    ref, ours = tiny_pair
    c = tiny_config
    b, g = tokens.shape[0], c.grid_size
    rows, heads = chunk_plan(b, c.encoder_heads, g, g, budget) if budget else (g, c.encoder_heads)
    assert (rows, heads) == {0: (16, 2), 2**18: (4, 2), 2**16: (1, 2), 2**15: (1, 1)}[budget]
    block = EncoderBlock(c.encoder_dim, c.encoder_heads, c.mlp_ratio, g, 0, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0), chunk_bytes=budget)
    nnx.update(block, nnx.state(ours.image_encoder.blocks[1]))
    with torch.no_grad():
        want = ref.image_encoder.blocks[1](torch.from_numpy(tokens)).numpy()
    assert relative_error(block(jnp.asarray(tokens)), want) <= TOL


def test_window_padding_is_exercised(tiny_config):
    """The tiny grid is not a multiple of the window, so the reference's padding path is compared."""
    assert tiny_config.grid_size % tiny_config.window_size != 0


def test_neck(tiny_config, tiny_pair, tokens):
    ref, ours = tiny_pair
    with torch.no_grad():
        want = nhwc(ref.image_encoder.neck(nchw(tokens)))
    assert relative_error(ours.image_encoder.neck(jnp.asarray(tokens)), want) <= TOL


def test_image_encoder(tiny_config, tiny_pair):
    ref, ours = tiny_pair
    s = tiny_config.image_size
    x = np.random.default_rng(2).normal(size=(2, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref.image_encoder(nchw(x)))
    got = jax.jit(lambda m, x: m.embed(x))(ours, jnp.asarray(x))
    assert got.shape == (2, tiny_config.grid_size, tiny_config.grid_size, 256)
    assert relative_error(got, want) <= TOL


def test_dense_positional_encoding(tiny_pair):
    ref, ours = tiny_pair
    want = ref.prompt_encoder.get_dense_pe().numpy()[0].transpose(1, 2, 0)
    assert relative_error(ours.dense_pe(), want) <= TOL


@pytest.mark.parametrize("kind", ["points", "points+boxes", "boxes", "masks", "points+masks"])
def test_prompt_encoder(tiny_config, tiny_pair, rng, kind):
    ref, ours = tiny_pair
    b, n, p = 2, 5, 3
    coords, labels, boxes, masks = sam_refs.random_prompts(rng, b, n, p, tiny_config.image_size)
    use_p, use_b, use_m = "points" in kind, "boxes" in kind, "masks" in kind
    sparse, dense = ours.prompt_encoder(
        jnp.asarray(coords) if use_p else None, jnp.asarray(labels) if use_p else None,
        jnp.asarray(boxes) if use_b else None, jnp.asarray(masks) if use_m else None, (b, n))
    for i in range(b):
        with torch.no_grad():
            ws, wd = ref.prompt_encoder(
                points=(torch.from_numpy(coords[i]), torch.from_numpy(labels[i])) if use_p else None,
                boxes=torch.from_numpy(boxes[i]) if use_b else None, masks=nchw(masks[i]) if use_m else None)
        assert sparse[i].shape == ws.shape
        if ws.numel():
            assert relative_error(sparse[i], ws.numpy()) <= TOL
        assert relative_error(jnp.broadcast_to(dense, (b, n) + wd.shape[2:] + (wd.shape[1],))[i], nhwc(wd)) <= TOL


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "points+boxes", "boxes", "points+masks"])
def test_mask_decoder(tiny_config, tiny_pair, rng, kind, multimask):
    """N prompts for each of B images in one call against the reference, image by image."""
    ref, ours = tiny_pair
    b, n, p = 2, 4, 2
    g = tiny_config.grid_size
    emb = np.random.default_rng(3).normal(size=(b, g, g, 256)).astype(np.float32)
    coords, labels, boxes, masks = sam_refs.random_prompts(rng, b, n, p, tiny_config.image_size)
    use_p, use_b, use_m = "points" in kind, "boxes" in kind, "masks" in kind
    low, iou = jax.jit(lambda m, *a: m.decode(*a, multimask_output=multimask))(
        ours, jnp.asarray(emb), jnp.asarray(coords) if use_p else None, jnp.asarray(labels) if use_p else None,
        jnp.asarray(boxes) if use_b else None, jnp.asarray(masks) if use_m else None)
    k = 3 if multimask else 1
    assert low.shape == (b, n, k, 4 * g, 4 * g) and iou.shape == (b, n, k)
    for i in range(b):
        want_low, want_iou = sam_refs.reference_decode(
            ref, nchw(emb[i:i + 1]), torch.from_numpy(coords[i]) if use_p else None,
            torch.from_numpy(labels[i]) if use_p else None, torch.from_numpy(boxes[i]) if use_b else None,
            nchw(masks[i]) if use_m else None, multimask_output=multimask)
        assert relative_error(low[i], want_low) <= TOL
        assert relative_error(iou[i], want_iou) <= TOL


def test_end_to_end(tiny_config, tiny_pair, photos):
    """Photos through preprocess -> embed -> decode -> postprocess against the reference ``Sam.forward``."""
    from segment_anything.utils.transforms import ResizeLongestSide

    ref, ours = tiny_pair
    s = tiny_config.image_size
    rng = np.random.default_rng(4)
    resize = ResizeLongestSide(s)
    embed = jax.jit(lambda m, x: m.embed(x))
    decode = jax.jit(lambda m, e, c, lab, b: m.decode(e, c, lab, b, multimask_output=True))
    for photo in photos:
        h, w = photo.shape[:2]
        x, input_size = preprocess(photo, s)
        pts = rng.uniform(0, [w, h], size=(6, 2, 2))
        labels = np.array([[1, 0]] * 6, np.int32)
        box = np.array([[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]] * 6)
        c_in = resize.apply_coords(pts, (h, w)).astype(np.float32)
        b_in = resize.apply_boxes(box, (h, w)).astype(np.float32)
        resized = torch.as_tensor(resize.apply_image(photo)).permute(2, 0, 1).contiguous()
        with torch.no_grad():
            want_emb = nhwc(ref.image_encoder(ref.preprocess(resized)[None]))
            out = ref([{"image": resized, "original_size": (h, w), "point_coords": torch.from_numpy(c_in),
                        "point_labels": torch.from_numpy(labels), "boxes": torch.from_numpy(b_in)}],
                      multimask_output=True)[0]
            want_full = ref.postprocess_masks(out["low_res_logits"], tuple(resized.shape[-2:]), (h, w)).numpy()
        emb = embed(ours, jnp.asarray(x)[None])
        low, iou = decode(ours, emb, jnp.asarray(c_in)[None], jnp.asarray(labels)[None], jnp.asarray(b_in)[None])
        full = postprocess_masks(low[0], input_size, (h, w), s)
        assert relative_error(emb, want_emb) <= TOL
        assert relative_error(low[0], out["low_res_logits"].numpy()) <= TOL
        assert relative_error(iou[0], out["iou_predictions"].numpy()) <= TOL
        assert relative_error(full, want_full) <= TOL
        assert np.array_equal(out["masks"].numpy(), want_full > 0)
        bad, near = sam_refs.mask_disagreement(np.asarray(full) > 0, want_full)
        assert bad == 0, f"{bad} mask pixels differ away from the threshold ({near} pixels within 1e-3 of it)"


def test_config_variants_match_the_registry():
    """Our vit_b/l/h configs build the same shapes as segment-anything's registry builders."""
    from segment_anything import sam_model_registry

    from zsp_jax.models.sam.convert import infer_config

    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sd = sam_model_registry[name]().state_dict()
        assert infer_config(sd, source_name=name) == SamConfig.from_name(name)


def test_split_state_under_jit(tiny_config, tiny_pair, rng):
    """``nnx.split`` + ``jax.jit`` of ``Sam.__call__`` (embed + decode), the path pipelines take."""
    ref, ours = tiny_pair
    s = tiny_config.image_size
    x = rng.normal(size=(1, s, s, 3)).astype(np.float32)
    coords, labels, _, _ = sam_refs.random_prompts(rng, 1, 3, 1, s)
    graphdef, state = nnx.split(ours)
    fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, multimask_output=False))
    low, iou = fn(state, jnp.asarray(x), jnp.asarray(coords), jnp.asarray(labels))
    with torch.no_grad():
        emb = ref.image_encoder(nchw(x))
    want_low, want_iou = sam_refs.reference_decode(ref, emb, torch.from_numpy(coords[0]),
                                                      torch.from_numpy(labels[0]), multimask_output=False)
    assert relative_error(low[0], want_low) <= TOL and relative_error(iou[0], want_iou) <= TOL


def test_decode_requires_a_prompt(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match="points, boxes or mask"):
        ours.decode(jnp.zeros((1, 16, 16, 256)), None, None, multimask_output=True)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["bf16-compute", "bf16-compute+weights"])
def test_bf16_stays_close_to_fp32(tiny_config, tiny_pair, param_dtype):
    """The bf16 option: outputs within a few percent of our fp32 model, binary masks nearly all equal.

    Measured on this tiny model: embedding 7.4e-3, low-res logits 1.7e-2, IoU 1.7e-2 (relative
    error), 99.5 % of low-res mask pixels agree. The bounds leave about 3x headroom over these.
    docs/benchmarks.md states the vit_b figures from tools/bench_sam.py.
    """
    ref, f32 = tiny_pair
    bf16 = sam_refs.flax_sam_from_reference(ref, tiny_config, dtype=jnp.bfloat16, param_dtype=param_dtype)
    rng = np.random.default_rng(0)
    s = tiny_config.image_size
    x = rng.normal(size=(2, s, s, 3)).astype(np.float32)
    coords, labels, boxes, _ = sam_refs.random_prompts(rng, 2, 4, 2, s)
    run = jax.jit(lambda m, *a: (m.embed(a[0]),) + m(*a, multimask_output=True))
    emb32, low32, iou32 = run(f32, x, coords, labels, boxes)
    emb16, low16, iou16 = run(bf16, x, coords, labels, boxes)
    assert emb16.dtype == jnp.bfloat16 and low16.dtype == iou16.dtype == jnp.float32
    assert relative_error(emb16.astype(jnp.float32), emb32) <= 2e-2
    assert relative_error(low16, low32) <= 5e-2
    assert relative_error(iou16, iou32) <= 5e-2
    assert np.mean((np.asarray(low16) > 0) == (np.asarray(low32) > 0)) >= 0.98

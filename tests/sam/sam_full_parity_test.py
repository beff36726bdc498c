"""Full-size parity: SAM vit_b at 1024 x 1024 against segment-anything, through a converted checkpoint.

The reference is ``sam_model_registry["vit_b"]`` with every tensor randomised, saved with
``torch.save`` and converted with ``convert_checkpoint`` (so this is also the vit_b converter
test). One reference image encoding costs 10-16 s on the 2-core CI machine, so the predictors
and every reference output are computed once per module and shared by the assertions. The
per-component tests at the end reuse the two models on random inputs at vit_b's real sizes
(a 64 x 64 token grid padded to 70 x 70 for the 14 x 14 windows, global attention over 4096
tokens, the 256 x 256 mask inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from zsp_jax.models.sam import SamConfig, SamPredictor, convert_checkpoint, load_sam
from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error

pytestmark = pytest.mark.full_size
TOL = 1e-4


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory, photos):
    from segment_anything import SamPredictor as RefPredictor

    ref = sam_refs.registry_sam("vit_b", seed=0)
    tmp = tmp_path_factory.mktemp("vit_b")
    torch.save(ref.state_dict(), tmp / "sam_vit_b.pth")
    config = convert_checkpoint(tmp / "sam_vit_b.pth", tmp / "sam_vit_b.safetensors", variant="vit_b")
    model, loaded = load_sam(tmp / "sam_vit_b.safetensors")
    photo = photos[1]  # 300 x 451: resized to 681 x 1024, padded at the bottom
    h, w = photo.shape[:2]
    theirs, ours = RefPredictor(ref), SamPredictor(model)
    theirs.set_image(photo)
    ours.set_image(photo)

    grid = (np.stack(np.meshgrid(np.linspace(0.1, 0.9, 4), np.linspace(0.1, 0.9, 4)), -1).reshape(16, 1, 2)
            * [w, h])
    coords = torch.as_tensor(theirs.transform.apply_coords(grid, (h, w)), dtype=torch.float)
    labels = torch.ones(16, 1, dtype=torch.int)
    boxes = np.array([[0.1 * w, 0.1 * h, 0.6 * w, 0.8 * h], [0.5 * w, 0.2 * h, 0.95 * w, 0.9 * h]])
    b_in = torch.as_tensor(theirs.transform.apply_boxes(boxes, (h, w)), dtype=torch.float)
    ref_points = [t.numpy() for t in theirs.predict_torch(coords, labels, multimask_output=True, return_logits=True)]
    ref_boxes = [t.numpy() for t in theirs.predict_torch(None, None, b_in, multimask_output=False,
                                                         return_logits=True)]
    return dict(config=config, loaded=loaded, ours=ours, theirs=theirs, ref=ref, model=model, grid=grid, boxes=boxes,
                ref_points=ref_points, ref_boxes=ref_boxes,
                ours_points=ours.predict(grid, np.ones((16, 1)), multimask_output=True, return_logits=True),
                ours_boxes=ours.predict(box=boxes, multimask_output=False, return_logits=True))


def test_converted_config(vit_b):
    assert vit_b["config"] == vit_b["loaded"] == SamConfig.vit_b()


def test_image_embedding(vit_b):
    want = vit_b["theirs"].get_image_embedding().numpy().transpose(0, 2, 3, 1)
    got = vit_b["ours"].get_image_embedding()
    assert got.shape == (1, 64, 64, 256)
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_low_res_logits_and_iou(vit_b, kind):
    ref_logits, ref_iou, ref_low = vit_b[f"ref_{kind}"]
    logits, iou, low = vit_b[f"ours_{kind}"]
    assert low.shape == ref_low.shape and low.shape[-2:] == (256, 256)
    assert relative_error(low, ref_low) <= TOL
    assert relative_error(iou, ref_iou) <= TOL
    assert relative_error(logits, ref_logits) <= TOL


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_final_masks(vit_b, kind):
    """Binary masks at the original size are identical except where the reference logit is within 1e-3 of 0."""
    ref_logits = vit_b[f"ref_{kind}"][0]
    logits = vit_b[f"ours_{kind}"][0]
    assert logits.shape == ref_logits.shape and logits.shape[-2:] == (300, 451)
    bad, near = sam_refs.mask_disagreement(logits > 0, ref_logits)
    assert bad == 0, f"{bad} pixels differ away from the threshold ({near} within 1e-3 of it)"
    assert 0.01 < np.mean(ref_logits > 0) < 0.99  # the masks are not trivially empty or full


# ----------------------------------------------------------------------------- per component, vit_b sizes


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tokens():
    """Random (1, 64, 64, 768) encoder tokens."""
    return np.random.default_rng(1).normal(size=(1, 64, 64, 768)).astype(np.float32)


def test_patch_embedding(vit_b):
    ref, model = vit_b["ref"], vit_b["model"]
    x = np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
    with torch.no_grad():
        want = (ref.image_encoder.patch_embed(nchw(x)) + ref.image_encoder.pos_embed).numpy()
    enc = model.image_encoder
    got = jax.jit(lambda e, x: e.patch_embed(x) + e.pos_embed.get_value())(enc, jnp.asarray(x))
    assert got.shape == want.shape == (1, 64, 64, 768)
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("index", [0, 2], ids=["windowed", "global"])
def test_encoder_block(vit_b, tokens, index):
    ref, model = vit_b["ref"], vit_b["model"]
    assert (index in model.config.global_attn_indexes) == (index == 2)
    assert ref.image_encoder.blocks[index].window_size == (0 if index == 2 else 14)
    with torch.no_grad():
        want = ref.image_encoder.blocks[index](torch.from_numpy(tokens)).numpy()
    got = jax.jit(lambda b, x: b(x))(model.image_encoder.blocks[index], jnp.asarray(tokens))
    assert relative_error(got, want) <= TOL


def test_neck(vit_b, tokens):
    ref, model = vit_b["ref"], vit_b["model"]
    with torch.no_grad():
        want = nhwc(ref.image_encoder.neck(nchw(tokens)))
    got = jax.jit(lambda n, x: n(x))(model.image_encoder.neck, jnp.asarray(tokens))
    assert got.shape == (1, 64, 64, 256)
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("kind", ["points+boxes", "points+masks"])
def test_prompt_encoder_and_mask_decoder(vit_b, kind):
    """4 prompts on a random embedding: sparse/dense prompt embeddings, then low-res logits and IoU."""
    ref, model = vit_b["ref"], vit_b["model"]
    rng = np.random.default_rng(5)
    n = 4
    emb = rng.normal(size=(1, 64, 64, 256)).astype(np.float32)
    coords, labels, boxes, masks = sam_refs.random_prompts(rng, 1, n, 2, 1024)
    use_b, use_m = "boxes" in kind, "masks" in kind
    args = (jnp.asarray(coords), jnp.asarray(labels), jnp.asarray(boxes) if use_b else None,
            jnp.asarray(masks) if use_m else None)
    sparse, dense = jax.jit(lambda p, *a: p(*a, (1, n)))(model.prompt_encoder, *args)
    t_boxes = torch.from_numpy(boxes[0]) if use_b else None
    t_masks = nchw(masks[0]) if use_m else None
    with torch.no_grad():
        want_sparse, want_dense = ref.prompt_encoder(
            points=(torch.from_numpy(coords[0]), torch.from_numpy(labels[0])), boxes=t_boxes, masks=t_masks)
    assert sparse[0].shape == want_sparse.shape
    assert relative_error(sparse[0], want_sparse.numpy()) <= TOL
    assert relative_error(jnp.broadcast_to(dense, (1, n, 64, 64, 256))[0], nhwc(want_dense)) <= TOL
    for multimask in (True, False):
        low, iou = jax.jit(lambda m, *a: m.decode(*a, multimask_output=multimask))(model, jnp.asarray(emb), *args)
        want_low, want_iou = sam_refs.reference_decode(
            ref, nchw(emb), torch.from_numpy(coords[0]), torch.from_numpy(labels[0]), t_boxes, t_masks,
            multimask_output=multimask)
        assert low.shape == (1, n, 3 if multimask else 1, 256, 256)
        assert relative_error(low[0], want_low) <= TOL
        assert relative_error(iou[0], want_iou) <= TOL

"""The AMG point decoder equals Sam.decode (same weights, single foreground points, 3 masks)."""

import jax
import numpy as np
from flax import nnx

from zsp_jax.amg.decoder import model_decoder, point_decoder


def test_point_decoder_equals_model_decode(sam_pair, tiny_config):
    _, model = sam_pair
    graphdef, state = nnx.split(model)
    g, s = tiny_config.grid_size, tiny_config.image_size
    emb = jax.random.normal(jax.random.key(0), (2, g, g, tiny_config.prompt_dim))
    points = jax.random.uniform(jax.random.key(1), (2, 8, 2)) * s

    @jax.jit
    def run(state, emb, points):
        m = nnx.merge(graphdef, state)
        grouped = point_decoder(m, group=4, upscale_rows=4)  # 2 groups of 4, 4 slabs of rows
        single = point_decoder(m, group=16)
        reference = model_decoder(m)
        return (reference.decode(reference.image_context(emb), points),
                grouped.decode(grouped.image_context(emb), points),
                single.decode(single.image_context(emb), points[:, :3]))

    (ref_low, ref_iou), (low, iou), (low3, iou3) = jax.tree.map(np.asarray, run(state, emb, points))
    assert low.shape == ref_low.shape == (2, 8, 3, 4 * g, 4 * g) and iou.shape == (2, 8, 3)
    scale = np.abs(ref_low).max()
    assert np.abs(low - ref_low).max() <= 1e-5 * scale
    assert np.abs(low3 - ref_low[:, :3]).max() <= 1e-5 * scale
    np.testing.assert_allclose(iou, ref_iou, atol=1e-5, rtol=0)
    np.testing.assert_allclose(iou3, ref_iou[:, :3], atol=1e-5, rtol=0)
    assert np.std(ref_iou) > 1e-3  # the prompts give different answers


def test_iou_threshold_skips_only_filtered_prompts(sam_pair, tiny_config):
    """With an IoU threshold, a prompt with a mask above it gets the same logits as without; a prompt that has none
    in either image is not upscaled at all (its logits stay 0)."""
    _, model = sam_pair
    graphdef, state = nnx.split(model)
    g, s = tiny_config.grid_size, tiny_config.image_size
    emb = jax.random.normal(jax.random.key(2), (2, g, g, tiny_config.prompt_dim))
    points = jax.random.uniform(jax.random.key(3), (2, 8, 2)) * s

    def run(state, emb, points, threshold):
        decoder = point_decoder(nnx.merge(graphdef, state), group=4)
        return decoder.decode(decoder.image_context(emb), points, threshold)

    full_low, full_iou = jax.tree.map(np.asarray, jax.jit(run, static_argnums=3)(state, emb, points, None))
    best = full_iou.max(axis=-1)  # (2, 8): a prompt is wanted if its best mask passes
    threshold = float(np.sort(best, axis=1)[:, -3].max())  # at most 2 wanted prompts in each image
    wanted = best > threshold
    assert 1 <= wanted.sum() and wanted.sum(axis=1).max() <= 2
    low, iou = jax.tree.map(np.asarray, jax.jit(run, static_argnums=3)(state, emb, points, threshold))
    np.testing.assert_array_equal(iou, full_iou)
    np.testing.assert_allclose(low[wanted], full_low[wanted], rtol=0, atol=1e-6 * np.abs(full_low).max())
    skipped = np.all(low == 0, axis=(2, 3, 4))  # (2, 8)
    np.testing.assert_array_equal(skipped, np.broadcast_to(~wanted.any(axis=0), (2, 8)))
    assert skipped.sum() >= 2 * 4 and np.abs(full_low[skipped]).max() > 0

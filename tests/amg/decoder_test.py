"""The AMG point decoder equals Sam.decode (same weights, single foreground points, 3 masks)."""

import jax
import numpy as np
from flax import nnx

from zsp_jax.amg.decoder import point_decoder
from zsp_jax.amg.device import model_decoder


def test_point_decoder_equals_model_decode(sam_pair, tiny_config):
    _, model = sam_pair
    graphdef, state = nnx.split(model)
    g, s = tiny_config.grid_size, tiny_config.image_size
    emb = jax.random.normal(jax.random.key(0), (2, g, g, tiny_config.prompt_dim))
    points = jax.random.uniform(jax.random.key(1), (2, 8, 2)) * s

    @jax.jit
    def run(state, emb, points):
        m = nnx.merge(graphdef, state)
        grouped = point_decoder(m, group=4, upscale_rows=4)(emb, points)  # 2 groups of 4, 4 slabs of rows
        single = point_decoder(m, group=16)(emb, points[:, :3])
        return model_decoder(m)(emb, points), grouped, single

    (ref_low, ref_iou), (low, iou), (low3, iou3) = jax.tree.map(np.asarray, run(state, emb, points))
    assert low.shape == ref_low.shape == (2, 8, 3, 4 * g, 4 * g) and iou.shape == (2, 8, 3)
    scale = np.abs(ref_low).max()
    assert np.abs(low - ref_low).max() <= 1e-5 * scale
    assert np.abs(low3 - ref_low[:, :3]).max() <= 1e-5 * scale
    np.testing.assert_allclose(iou, ref_iou, atol=1e-5, rtol=0)
    np.testing.assert_allclose(iou3, ref_iou[:, :3], atol=1e-5, rtol=0)
    assert np.std(ref_iou) > 1e-3  # the prompts give different answers

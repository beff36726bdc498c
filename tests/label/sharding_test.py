"""Results do not depend on the device count: the same groups of images on 4 devices and on 1 give the same
label maps, confidence maps and segment masks bit for bit. Segment similarities agree to float32 rounding:
XLA's CPU matrix products split their reductions by the threads a device gets, which changes the last bit
of a cosine (never a label here)."""

import jax
import numpy as np

from tests.fixtures.label_options import make_options
from zsp_jax.models.random_checkpoints import random_weight_label_config
from zsp_jax.label.labeller import Labeller
from zsp_jax.references.amg import sample_images
from zsp_jax.utils.sharding import data_mesh

SIZES = [(150, 200), (140, 230), (180, 256), (129, 193), (192, 240), (160, 210), (135, 250), (170, 199)]


def test_eight_devices_equal_one(sam_pair, clip_pair):
    assert jax.device_count() >= 8
    _, sam = sam_pair
    _, _, clip, tokenizer = clip_pair
    config = random_weight_label_config()
    config.amg.points_per_side = 4
    config.amg.max_masks = 48
    config.write_confidence = True
    config.write_segments = True
    options = make_options(config)
    images = sample_images(SIZES)
    results = {}
    for n_dev, per_dev in ((1, 1), (8, 1), (1, 2), (4, 2)):
        lab = Labeller(sam, clip, tokenizer, options, mesh=data_mesh(jax.devices()[:n_dev]), images_per_device=per_dev)
        assert lab.batch_size == n_dev * per_dev
        results[n_dev, per_dev] = lab.label(images)
    for single, many in (((1, 1), (8, 1)), ((1, 2), (4, 2))):
        for one, other in zip(results[single], results[many]):
            assert one.num_segments == other.num_segments >= 40
            np.testing.assert_array_equal(one.label, other.label)
            np.testing.assert_array_equal(one.confidence, other.confidence)
            for a, b in zip(one.segments, other.segments):
                for key in ("similarity", "score", "predicted_iou", "stability_score"):
                    assert abs(a.pop(key) - b.pop(key)) <= 1e-6, key
                assert a == b  # classes, boxes, areas and the RLE masks
    assert len({int(v) for r in results[1, 1] for v in np.unique(r.label)}) >= 2

"""A batch of images sharded over 8 devices gives the same masks as on 1 device; fast vs exact mode."""

import jax
import numpy as np

from zsp_jax.amg import AmgOptions, AutomaticMaskGenerator, data_mesh, shard_work
from zsp_jax.references.amg import masks_of, match_records, sample_images

# Eight images of one bucket (192 x 256), different sizes within it.
SIZES = [(150, 200), (140, 230), (180, 256), (129, 193), (192, 240), (160, 210), (135, 250), (170, 199)]


def test_eight_devices_equal_one_device(sam_pair):
    assert jax.device_count() >= 8
    _, model = sam_pair
    options = AmgOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.02,
                         stability_score_offset=0.05, box_nms_thresh=1.0, crop_nms_thresh=1.0, crop_n_layers=1,
                         crop_n_points_downscale_factor=2, max_masks=64)
    images = sample_images(SIZES)
    one = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=8)
    eight = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:8]), batch_size=8)
    out1, _ = one.generate_padded(images)
    out8, _ = eight.generate_padded(images)
    assert len(out8.valid.sharding.device_set) == 8  # really sharded
    out1, out8 = jax.tree.map(np.asarray, out1), jax.tree.map(np.asarray, out8)
    assert out1.valid.sum(axis=1).min() >= 20
    for name in out1._fields:  # bitwise identical: each device runs the same per-image program
        np.testing.assert_array_equal(getattr(out1, name), getattr(out8, name), err_msg=name)
    # Records through the host wrapper agree as well.
    for r1, r8 in zip(one.generate_batch(images), eight.generate_batch(images)):
        m = match_records(r1, r8)
        assert len(r1) >= 20 and m.ref_fraction == 1.0 and m.ours_fraction == 1.0


def test_shard_work_splits_round_robin():
    items = list(range(10))
    parts = [shard_work(items, i, 3) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == items
    # Defaults: jax.process_index() / jax.process_count(); a single process gets everything.
    assert jax.process_count() == 1 and shard_work(items) == items


def test_fast_mode_deviation_from_exact(sam_pair):
    """Fast mode returns the same candidate masks and IoUs; only the stability scores (and the boxes the
    filters and NMS see) come from every 4th pixel of each axis. Random-weight masks are speckled, the
    worst case for a subsample; measured here: median |delta stability| 0.004-0.008, max 0.022
    (scores 0.03-0.25 at offset 0.05). The bounds leave a margin of about 2.5x."""
    _, model = sam_pair
    base = AmgOptions(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                      stability_score_offset=0.05, box_nms_thresh=1.0)
    images = sample_images(SIZES[:2])
    mesh = data_mesh(jax.devices()[:1])
    exact = AutomaticMaskGenerator(model, base, mesh=mesh, batch_size=2).generate_batch(images)
    fast = AutomaticMaskGenerator(model, base.replace(mode="fast"), mesh=mesh, batch_size=2).generate_batch(images)
    for e, f in zip(exact, fast):
        assert len(e) >= 150
        m = match_records(e, f)
        assert m.ref_fraction >= 0.99 and m.ours_fraction >= 0.99
        d_iou = [abs(e[i]["predicted_iou"] - f[j]["predicted_iou"]) for i, j in m.pairs]
        d_stab = np.array([abs(e[i]["stability_score"] - f[j]["stability_score"]) for i, j in m.pairs])
        assert max(d_iou) <= 1e-6
        assert np.median(d_stab) <= 0.02 and d_stab.max() <= 0.06
        es = np.array([e[i]["stability_score"] for i, _ in m.pairs])
        fs = np.array([f[j]["stability_score"] for _, j in m.pairs])
        assert np.corrcoef(es, fs)[0, 1] >= 0.95


def test_images_per_device_batches_are_device_count_independent(sam_pair):
    """Two images per device step: 4 devices x 2 equal 1 device x 8 (the same groups of two images),
    and the records agree with one image at a time up to float rounding."""
    _, model = sam_pair
    options = AmgOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         stability_score_offset=0.05, box_nms_thresh=1.0, max_masks=48)
    images = sample_images(SIZES)
    one = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=8,
                                 images_per_device=2)
    four = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:4]), batch_size=8,
                                  images_per_device=2)
    assert one.tuning.images_per_device == four.tuning.images_per_device == 2
    out1, _ = one.generate_padded(images)
    out4, _ = four.generate_padded(images)
    out1, out4 = jax.tree.map(np.asarray, out1), jax.tree.map(np.asarray, out4)
    assert out1.valid.sum() >= 8 * 40
    for name in out1._fields:
        np.testing.assert_array_equal(getattr(out1, name), getattr(out4, name), err_msg=name)
    singles = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=1)
    for ours, single in zip(one.generate_batch(images), singles.generate_batch(images)):
        m = match_records(single, ours)
        assert m.ref_fraction >= 0.99 and m.ours_fraction >= 0.99


def test_generate_iter_streams_a_generator(sam_pair):
    """A generator input (no len) of images from two buckets: every index comes back once, as generate_batch."""
    _, model = sam_pair
    options = AmgOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         stability_score_offset=0.05, box_nms_thresh=1.0, max_masks=16)
    images = sample_images([(150, 200), (100, 90), (140, 230), (96, 80), (129, 193)])
    gen = AutomaticMaskGenerator(model, options, mesh=data_mesh(jax.devices()[:1]), batch_size=2)
    streamed = dict(gen.generate_iter(im for im in images))
    assert sorted(streamed) == list(range(5))
    batch = gen.generate_batch(images)
    for i in range(5):
        assert len(streamed[i]) == len(batch[i]) >= 10
        np.testing.assert_array_equal(masks_of(streamed[i]), masks_of(batch[i]))

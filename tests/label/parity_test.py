"""The labeller against a reference built from the PyTorch packages (segment-anything's generator,
gem-torch, torch interpolation, the rules written out), same random weights, real photos.

Random weights: the settings (``random_weight_label_config``) keep every candidate mask (no filters, no
NMS), so each image has over a hundred overlapping segments; the thresholds are chosen so that
segments fall on both sides of the no-class rule. Every test asserts that the comparison has
content: many segments, several labels, background present.
"""

import numpy as np

from tests.fixtures.label_options import make_options
from zsp_jax.models.random_checkpoints import random_weight_label_config
from zsp_jax.label.labeller import Labeller
from zsp_jax.references.amg import sample_images
from zsp_jax.references.label_reference import ReferenceLabeller


def _compare(sam_pair, clip_pair, mesh, config, classes, sizes, *, min_labels):
    ref_sam, sam = sam_pair
    open_clip_model, gem_wrapper, clip, tokenizer = clip_pair
    options = make_options(config, classes)
    ours = Labeller(sam, clip, tokenizer, options, mesh=mesh).label(sample_images(sizes))
    texts, _ = options.classes.prompt_rows()
    ref = ReferenceLabeller(ref_sam, options.amg.reference_kwargs(), open_clip_model, gem_wrapper, texts,
                            options.rules(), clip_size=config.clip_size)
    labels_seen = set()
    for image, result in zip(sample_images(sizes), ours):
        ref_map, records = ref.label(image)
        assert len(records) >= 100 and result.num_segments == len(records)
        agree = np.mean(result.label == ref_map)
        assert agree >= 0.99, agree
        labels_seen |= set(np.unique(ref_map).tolist())
        # Segment classes agree too (same masks in the same order: the generator's).
        ours_classes = [s["class"] for s in result.segments]
        assert np.mean(np.equal(ours_classes, [r["class"] for r in records])) >= 0.98
    assert len(labels_seen) >= min_labels, labels_seen
    return labels_seen


def test_default_rules_equal_reference(sam_pair, clip_pair, one_device_mesh):
    """Bilinear pooling, best cosine with a threshold, larger segments painted first, uncovered = 255."""
    config = random_weight_label_config()
    config.threshold = 0.2
    seen = _compare(sam_pair, clip_pair, one_device_mesh, config, "voc", [(150, 200), (140, 230), (160, 180)],
                    min_labels=4)
    assert 0 in seen and 255 in seen  # the threshold sent segments to background; some pixels uncovered


def test_other_rules_equal_reference(sam_pair, clip_pair, one_device_mesh, tmp_path):
    """Area pooling, softmax rule, background prompts, synonyms (mean), IoU paint order, uncovered = 0."""
    classes = tmp_path / "classes.txt"
    classes.write_text("cat: cat; kitten\ndog\nbird: bird; parrot; eagle\n# a comment\ncar\nperson: person; man\n")
    config = random_weight_label_config()
    config.amg.points_per_side = 6
    config.amg.max_masks = 108
    config.pooling = "area"
    config.no_class = "softmax"
    config.temperature = 30.0
    config.threshold = 0.5
    config.synonyms = "mean"
    config.paint_order = "iou_asc"
    config.uncovered = "background"
    config.background_prompts = "sky; wall"
    seen = _compare(sam_pair, clip_pair, one_device_mesh, config, str(classes),
                    [(150, 200), (140, 230), (170, 150)], min_labels=3)
    assert 0 in seen and 255 not in seen

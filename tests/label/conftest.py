"""Shared fixtures of the labeller tests: a tiny SAM pair and a tiny CLIP pair (reference and ours, same
random weights), and labeller options that leave many segments with random weights."""

import jax
import pytest

from zsp_jax.label.classes import load_classes
from zsp_jax.label.options import LabelOptions, default_label_config
from zsp_jax.models.sam import SamConfig
from zsp_jax.testing.amg import reference_pair

SAM_IMAGE_SIZE = 256  # tiny SAM: 16 x 16 embedding grid
CLIP_SIZE = 64  # tiny CLIP (patch 8): an 8 x 8 feature grid


def many_segments_config():
    """Random-weight settings under which segments survive and several classes appear (see
    environment.md section 7): no IoU / stability filter, stability offset 0.05, no NMS."""
    c = default_label_config()
    c.clip_size = CLIP_SIZE
    c.gem_depth = 3  # the tiny CLIP has 3 vision blocks: GEM on the last 2
    c.amg.points_per_side = 8
    c.amg.pred_iou_thresh = 0.0
    c.amg.stability_score_thresh = 0.0
    c.amg.stability_score_offset = 0.05
    c.amg.box_nms_thresh = 1.0
    c.amg.max_masks = 192  # 64 points x 3 masks: nothing is truncated
    c.threshold = 0.02
    return c


@pytest.fixture(scope="session")
def sam_pair():
    return reference_pair(SamConfig.tiny(image_size=SAM_IMAGE_SIZE), 0)


@pytest.fixture(scope="session")
def clip_pair():
    """(open_clip model, GEM reference wrapper, our ClipModel, tokenizer) with the same random weights."""
    from zsp_jax.models.clip import ClipTokenizer
    from zsp_jax.models.clip.convert import convert_state_dict
    from zsp_jax.testing.clip import gem_reference, tiny_open_clip

    ref = tiny_open_clip(quick_gelu=True, seed=3)
    ours = convert_state_dict(ref.state_dict(), "open_clip", act="quick_gelu").build()
    return ref, gem_reference(ref, depth=3), ours, ClipTokenizer.load()


def make_options(config=None, classes="voc"):
    return LabelOptions.from_config(config if config is not None else many_segments_config(), load_classes(classes))


@pytest.fixture(scope="session")
def one_device_mesh():
    from zsp_jax.utils.sharding import data_mesh

    return data_mesh(jax.devices()[:1])

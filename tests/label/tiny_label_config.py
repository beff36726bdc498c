"""Config of the labeller's command-line tests: tiny random models, settings that keep many segments."""

from zsp_jax.label.default_config import get_config as default_config


def get_config(arg=None):
    c = default_config(arg)
    lab = c.label
    lab.clip_size = 64
    lab.gem_depth = 3
    lab.amg.points_per_side = 4
    lab.amg.pred_iou_thresh = 0.0
    lab.amg.stability_score_thresh = 0.0
    lab.amg.stability_score_offset = 0.05
    lab.amg.box_nms_thresh = 1.0
    lab.amg.max_masks = 48
    lab.threshold = 0.0
    lab.bucket = 256  # one program for every image up to 256 px
    lab.max_side = 256  # larger images are labelled at 256 and their maps resized
    lab.decode_threads = 2
    lab.write_threads = 2
    return c

"""Label settings of the parity command's tests: the tiny random models, the default AMG filters (which keep
no mask with random weights, so the command's candidate fallback is exercised), a 4 x 4 point grid."""

from zsp_jax.label.default_config import get_config as default_config


def get_config(arg=None):
    c = default_config(arg)
    c.label.clip_size = 64  # the tiny CLIP has 8 x 8 patches: an 8 x 8 feature grid
    c.label.gem_depth = 3  # and 3 vision blocks: GEM on the last 2
    c.label.sam_allow_custom = True  # the tiny SAM is none of vit_b / vit_l / vit_h
    c.label.amg.points_per_side = 4
    return c

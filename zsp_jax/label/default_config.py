r"""Default config of ``python -m zsp_jax.label`` when no ``--config`` is given: label a folder.

    python -m zsp_jax.label --images photos/ --classes voc --out runs/photos \
        --sam sam_vit_h_4b8939.pth --clip ViT-B-16.pt --config.label.threshold=0.25

Every ``label.*`` field (``zsp_jax.label.options.default_label_config``) can be overridden with
``--config.label.<field>=<value>``.
"""

import ml_collections

from zsp_jax.label.options import default_label_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/label"
    c.label = default_label_config()
    return c

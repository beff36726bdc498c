r"""Evaluate a checkpoint: mIoU and per-class IoU on the validation list of a config.

    python -m zsp_jax.evaluate --config configs/voc.py:split=1464 --config.data.root=data/VOCdevkit/VOC2012 \
        --checkpoint runs/voc_1464_r101_321_zsp              # the run's best checkpoint
    python -m zsp_jax.evaluate --config configs/voc.py --checkpoint runs/.../checkpoints/8000
    python -m zsp_jax.evaluate --config configs/voc.py --checkpoint exp/pascal/unimatch/r101/1464/best.pth
    python -m zsp_jax.evaluate --config configs/smoke.py --config.eval.mode=sliding_window

``--checkpoint``: a run's work directory (its best checkpoint by mIoU), one of its
``checkpoints/<step>`` directories, a converted ``.safetensors`` (``tools/convert_backbone.py``)
or a UniMatch-trained ``.pth`` (converted in memory; needs torch). Default: the best checkpoint
of ``config.workdir``. The mode, bucket and batch come from ``config.eval.*``. The result is
printed (mIoU, per-class IoU) and written to ``--output`` (default
``<workdir>/eval_<mode>.json``).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "config file[:variant args]",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "run directory, checkpoint step directory, .safetensors or .pth")
_OUTPUT = flags.DEFINE_string("output", None, "result JSON (default <workdir>/eval_<mode>.json)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from zsp_jax.train import stage

    result = stage.evaluate(_CONFIG.value, _CHECKPOINT.value, output=_OUTPUT.value)
    width = max(len(n) for n in result["per_class"])
    for name, iou in result["per_class"].items():
        print(f"  {name:<{width}}  {'-' if iou is None else f'{iou:6.2f}'}")
    print(f"mIoU {result['miou']:.2f} (UniMatch's definition: mean over all {len(result['per_class'])} classes); "
          f"pixel accuracy {result['pixel_accuracy']:.2f}; {result['output']}")


if __name__ == "__main__":
    app.run(main)

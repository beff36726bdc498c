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
``<workdir>/eval_<mode>.json``). Library logs go to ``<workdir>/logs/``; a mistake is one
``error:`` line and exit code 2.
"""

from __future__ import annotations

import os

from absl import app, flags

from zsp_jax import cli

_CONFIG = cli.define_config_flag("configs/smoke.py")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "run directory, checkpoint step directory, .safetensors or .pth")
_OUTPUT = flags.DEFINE_string("output", None, "result JSON (default <workdir>/eval_<mode>.json)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library logs and tracebacks on the console")


def check_inputs(checkpoint: str | None, output: str | None) -> None:
    """The command's own inputs, before any work: ``--checkpoint`` exists, ``--output`` is writable."""
    from zsp_jax.utils import io

    if checkpoint is not None and not os.path.exists(os.path.expanduser(checkpoint)):
        raise cli.UsageError(f"--checkpoint={checkpoint}: no such file or directory (give a run's workdir, one of its "
                             f"checkpoints/<step> directories, a .safetensors or a UniMatch .pth)")
    if output is not None:
        problem = io.output_file_problem(output)
        if problem:
            raise cli.UsageError(f"--output={output}: {problem}")


def main(argv: list[str]) -> None:
    logs: dict[str, str] = {}

    def run() -> None:
        from zsp_jax import runtime
        from zsp_jax.train import checkpoint_eval

        config = _CONFIG.value
        check_inputs(_CHECKPOINT.value, _OUTPUT.value)
        logs["file"] = runtime.route_logs(config.workdir, verbose=_VERBOSE.value)
        result = checkpoint_eval.evaluate(config, _CHECKPOINT.value, output=_OUTPUT.value)
        width = max(len(n) for n in result["per_class"])
        for name, iou in result["per_class"].items():
            print(f"  {name:<{width}}  {'-' if iou is None else f'{iou:6.2f}'}")
        print(f"mIoU {result['miou']:.2f} (UniMatch's definition: mean over all {len(result['per_class'])} classes); "
              f"pixel accuracy {result['pixel_accuracy']:.2f}; {result['output']}")

    cli.run_main(run, verbose=lambda: _VERBOSE.value, log_file=lambda: logs.get("file"))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

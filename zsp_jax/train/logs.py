"""What a training run writes for people to look at: scalars, TensorBoard events, plots.

Only process 0 writes (``RunLog(enabled=False)`` elsewhere). Files in the work directory:

* ``train_metrics.jsonl``: one JSON object per logged step (loss terms, mask ratio, learning
  rate, gradient norm, images/s); ``eval_metrics.jsonl``: one per evaluation (mIoU, per-class
  IoU, pixel accuracy; ``unimatch_v2``: ``miou_ema``, ``pixel_accuracy_ema``, ``per_class_ema`` beside them). Appended and flushed as they come, so a killed run keeps its history;
  a resumed run first drops the lines past the step it resumes from.
* ``tensorboard/``: event files (``zsp_jax.train.events``, no TensorFlow): ``train/<metric>`` and
  ``eval/miou``, ``eval/pixel_accuracy``, ``eval/iou/<class>`` (``unimatch_v2``: also the EMA teacher's
  ``eval/miou_ema``, ``eval/pixel_accuracy_ema``, ``eval/iou_ema/<class>``, as V2 logs ``eval/mIoU_ema``); each session's file tells
  TensorBoard to drop earlier sessions' events past the step it resumes from (from step 1 when
  a run was killed before its first checkpoint).
* ``plots/loss.png`` and ``plots/miou.png`` (matplotlib, Agg), redrawn after every evaluation
  and at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from zsp_jax.train import events
from zsp_jax.utils import io

TRAIN_LOG, EVAL_LOG = "train_metrics.jsonl", "eval_metrics.jsonl"
TB_DIR, PLOTS_DIR = "tensorboard", "plots"


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every complete line of a JSONL file ([] if absent); a torn last line (a kill mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path: str, max_step: int) -> None:
    """Rewrites ``path`` (atomically) without the records past ``max_step`` (a resume repeats those steps)."""
    if os.path.isfile(path):
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
        io.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


class RunLog:
    """Scalars to JSONL and TensorBoard, plots on demand.

    Args:
      workdir: the run's directory.
      enabled: False in processes other than 0 (every method is then a no-op).
      resume_step: the step a resumed run starts from (later records are dropped first).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.workdir = workdir
        self.enabled = enabled
        self.train_path = os.path.join(workdir, TRAIN_LOG)
        self.eval_path = os.path.join(workdir, EVAL_LOG)
        self.tb_dir = os.path.join(workdir, TB_DIR)
        self.plots_dir = os.path.join(workdir, PLOTS_DIR)
        self._writer = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            truncate_jsonl(self.train_path, resume_step)
            truncate_jsonl(self.eval_path, resume_step)
            # Always from the first step this session writes: a run killed before its first checkpoint
            # resumes at step 0 and must still hide the killed session's events.
            self._writer = events.EventWriter(self.tb_dir, purge_step=resume_step + 1)

    def _append(self, path: str, record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def train(self, step: int, scalars: dict[str, float]) -> None:
        """Logs one step's scalars (``step`` = optimiser steps done after it)."""
        if not self.enabled:
            return
        self._append(self.train_path, {"step": step, **scalars})
        self._writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        self._writer.flush()  # a killed run keeps what it logged

    def eval(self, step: int, result: dict[str, Any], ema: dict[str, Any] | None = None) -> None:
        """Logs one evaluation (``metrics.summarize`` output plus ``epoch``) and, for ``unimatch_v2``, the EMA
        teacher's evaluation at the same step (``ema``: the same keys), under ``*_ema`` names."""
        if not self.enabled:
            return
        keep = {k: result[k] for k in ("miou", "miou_present", "pixel_accuracy", "per_class", "epoch", "mode",
                                       "images", "seconds") if k in result}
        if ema is not None:
            keep.update({f"{k}_ema": ema[k] for k in ("miou", "miou_present", "pixel_accuracy", "per_class", "seconds")
                         if k in ema})
        self._append(self.eval_path, {"step": step, **keep})
        values = {"eval/miou": result["miou"], "eval/pixel_accuracy": result["pixel_accuracy"]}
        values.update({f"eval/iou/{name}": iou for name, iou in result.get("per_class", {}).items() if iou is not None})
        if ema is not None:
            values.update({"eval/miou_ema": ema["miou"], "eval/pixel_accuracy_ema": ema["pixel_accuracy"]})
            values.update({f"eval/iou_ema/{name}": iou for name, iou in ema.get("per_class", {}).items()
                           if iou is not None})
        self._writer.scalars(step, values)
        self._writer.flush()

    def plot(self) -> dict[str, str]:
        """Redraws ``plots/loss.png`` and ``plots/miou.png`` from the JSONL logs; returns their paths."""
        if not self.enabled:
            return {}
        train, evals = read_jsonl(self.train_path), read_jsonl(self.eval_path)
        out = {}
        if train:
            out["loss"] = plot_curves(os.path.join(self.plots_dir, "loss.png"), train,
                                      [k for k in ("loss", "loss_x", "loss_s", "loss_s1", "loss_s2", "loss_fp")
                                       if k in train[-1]],
                                      "training loss", log_y=True)
        if evals:
            out["miou"] = plot_curves(os.path.join(self.plots_dir, "miou.png"), evals,
                                      [k for k in ("miou", "miou_ema") if any(k in r for r in evals)],
                                      "validation mIoU (%)")
        return out

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_curves(path: str, records: Sequence[dict[str, Any]], keys: Sequence[str], title: str, *,
                log_y: bool = False) -> str:
    """One PNG with a line per key against ``step`` (written atomically); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    if log_y and all(r.get(k, 1) is None or r.get(k, 1) > 0 for r in records for k in keys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

"""Resuming a training run after something went wrong.

* A run stopped after its best checkpoint was written, then resumed, keeps that checkpoint (the
  keep-last rule never deletes it), reports it, and the eval stage evaluates it.
* A newest checkpoint that cannot be restored (truncated array file, truncated metadata, a missing
  item, a garbage input position) is moved aside, never deleted, and the run resumes from the
  previous one and ends with the parameters of an uninterrupted run; with no readable checkpoint the
  run stops with one error that lists what was tried. A second checkpoint that fails like the one
  before it is left in place (the same failure twice points at the reader, not the files).
* Resuming (or rerunning a finished run) with another schedule is refused, naming the field; a run
  written by another number of processes is refused before anything is moved.

"Stopped" here is an exception raised right after a checkpoint is saved, in process: what a new
process finds on disk is the same as after a SIGKILL at that moment (``train_test.py`` kills real
processes); it makes the moment exact.
"""

from __future__ import annotations

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from .conftest import smoke_config
from zsp_jax import workflow
from zsp_jax.data import readers, splits, synthetic
from zsp_jax.train import checkpointing, evaluation
from zsp_jax.train import training


class Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_task")
    root = synthetic.make_voc_like(str(base / "VOC2012"), num_train=12, num_val=4, size_range=(64, 80), seed=5)
    sp = str(base / "splits")
    splits.make_splits(readers.VocLayout(root), sp, ["1_4"], seed=0)
    return {"root": root, "splits": sp}


def _config(task, workdir, *, keep=2, eval_every=0):
    c = smoke_config(str(workdir), task["root"], task["splits"], split="1_4")
    c.train.mode = "supervised"
    c.train.crop_size = 64
    c.train.epochs = 100
    c.train.max_steps = 8
    c.train.num_devices = 1
    c.train.matmul_precision = "highest"
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = keep
    c.eval.bucket = 80
    c.eval.every_epochs, c.eval.every_steps, c.eval.at_end = 0, eval_every, bool(eval_every)
    return c


def _train(config, *, stop_after_save_at=None, monkeypatch=None):
    """Trains ``config``; with ``stop_after_save_at``, stops right after that step's checkpoint is saved."""
    if stop_after_save_at is None:
        return training.run(config)
    real_save = checkpointing.Checkpointer.save

    def save_then_stop(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        if step == stop_after_save_at:
            raise Stopped(step)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stopped):
        training.run(config)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)


def _steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _params(checkpoint) -> dict[str, np.ndarray]:
    tree = checkpointing.read_state_arrays(checkpoint)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_resumed_run_keeps_its_best_checkpoint_and_the_eval_stage_scores_it(task, tmp_path, monkeypatch):
    # Evaluations at steps 2, 4, 6 | 8 score 30, 50, 40 | 20: the best is step 4. Stopped after step 6 with
    # keep=1, the resumed run saves step 8, after which the last-kept rule alone would delete step 4.
    scores = iter([30.0, 50.0, 40.0, 20.0])

    def scripted(self, params, stats):
        return {"miou": next(scores), "miou_present": 0.0, "pixel_accuracy": 0.0, "per_class": {}, "seconds": 0.0,
                "images": 4, "mode": "original"}

    c = _config(task, tmp_path, keep=1, eval_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(evaluation.Evaluator, "evaluate", scripted)
        _train(c, stop_after_save_at=6, monkeypatch=patch)
        assert _steps(tmp_path) == [4, 6]
        summary = _train(c)
    assert _steps(tmp_path) == [4, 8]
    assert summary["best_step"] == 4 and summary["best_miou"] == 50.0
    assert summary["best_checkpoint"] == str(tmp_path / "checkpoints" / "4")
    assert [e["miou"] for e in summary["evals"]] == [30.0, 50.0, 40.0, 20.0]
    # The eval stage (real evaluator) evaluates step 4 and says so.
    c.stages = "eval"
    result = workflow.run(c, log=lambda *_: None)
    assert result["eval"]["checkpoint_step"] == 4 and result["eval"]["is_best"]
    assert result["eval"]["checkpoint"].startswith(str(tmp_path / "checkpoints" / "4"))
    assert "evaluated best checkpoint (step 4)" in workflow.where_everything_is(result)


def _truncate_largest_array_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "w") as f:
        f.write("{not json")


DAMAGE = {
    "truncated array file": _truncate_largest_array_file,
    "truncated state metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "deleted meta item": lambda d: shutil.rmtree(os.path.join(d, "meta")),
    "garbage input position": lambda d: _garbage(glob.glob(os.path.join(d, "input", "process_*.json"))[0]),
}


@pytest.fixture(scope="module")
def stopped_and_whole(task, tmp_path_factory):
    """A run stopped after step 6 (checkpoints 4 and 6 on disk) and the same run uninterrupted."""
    base = tmp_path_factory.mktemp("damage")
    whole = base / "whole"
    summary = _train(_config(task, whole))
    stopped = base / "stopped"
    with pytest.MonkeyPatch.context() as patch:
        _train(_config(task, stopped), stop_after_save_at=6, monkeypatch=patch)
    assert _steps(stopped) == [4, 6]
    return stopped, _params(summary["latest_checkpoint"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
        damage, stopped_and_whole, tmp_path, capsys):
    stopped, whole_params = stopped_and_whole
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    DAMAGE[damage](str(work / "checkpoints" / "6"))
    summary = _train(_config(_task_of(stopped), work))
    out = capsys.readouterr().out
    assert "checkpoint step 6 could not be restored" in out and "resuming at step 4" in out
    assert "memory: the train step fits" in out  # said before the first step (the CPU has room for this one)
    moved = glob.glob(str(work / "checkpoints_damaged" / "6-*"))
    assert len(moved) == 1 and os.path.isdir(moved[0])  # kept for the user, not deleted
    assert summary["steps"] == 8
    ours = _params(summary["latest_checkpoint"])
    assert ours.keys() == whole_params.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], whole_params[k], err_msg=k)


def _task_of(workdir) -> dict[str, str]:
    import json

    config = json.loads((workdir / "train_config.json").read_text())
    return {"root": config["data"]["root"], "splits": config["data"]["splits_dir"]}


def test_no_readable_checkpoint_stops_with_one_error_listing_what_was_tried(stopped_and_whole, tmp_path):
    stopped, _ = stopped_and_whole
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    DAMAGE["deleted meta item"](str(work / "checkpoints" / "6"))
    _garbage(os.path.join(work / "checkpoints" / "4", "meta", "metadata"))
    with pytest.raises(checkpointing.CheckpointsDamaged) as info:
        _train(_config(_task_of(stopped), work))
    message = str(info.value)
    assert "\n" not in message and str(work / "checkpoints" / "6") in message and str(work / "checkpoints" / "4") in message
    assert len(glob.glob(str(work / "checkpoints_damaged" / "*"))) == 2 and not info.value.same_failure


def test_a_second_checkpoint_failing_the_same_way_is_left_in_place(stopped_and_whole, tmp_path):
    stopped, _ = stopped_and_whole
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    for step in (4, 6):
        DAMAGE["deleted meta item"](str(work / "checkpoints" / str(step)))
    with pytest.raises(checkpointing.CheckpointsDamaged) as info:
        _train(_config(_task_of(stopped), work))
    message = str(info.value)
    assert "\n" not in message and "failed like the one before and was left in place" in message
    assert info.value.same_failure and len(info.value.tried) == 2
    assert [os.path.basename(p).split("-")[0] for p in glob.glob(str(work / "checkpoints_damaged" / "*"))] == ["6"]
    assert _steps(work) == [4]  # the second one stays where the user's run keeps it


def test_a_run_of_another_process_count_is_refused_before_anything_moves(stopped_and_whole, tmp_path):
    import json

    stopped, _ = stopped_and_whole
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    meta_file = work / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["processes"] == 1  # recorded by the run
    meta_file.write_text(json.dumps({**meta, "processes": 2}))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this is 1"):
        _train(_config(_task_of(stopped), work))
    assert _steps(work) == [4, 6] and not (work / "checkpoints_damaged").exists()


def test_another_schedule_is_refused_naming_the_field(stopped_and_whole, tmp_path):
    stopped, _ = stopped_and_whole
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    c = _config(_task_of(stopped), work)
    c.train.max_steps = 10
    with pytest.raises(ValueError, match=r"config field train\.max_steps=10 \(the run used 8\)"):
        _train(c)
    c.train.max_steps = 8
    summary = _train(c)  # the run's own schedule resumes
    c.train.max_steps = 12
    with pytest.raises(ValueError, match=r"train\.max_steps=12 \(the run used 8\).*finished"):
        _train(c)
    assert _train(_config(_task_of(stopped), work))["steps"] == summary["steps"] == 8

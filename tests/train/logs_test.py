"""What a run writes for people: TensorBoard event files (our writer, checked by an independent parser and,
where tensorboardX is installed, by its protobuf classes), JSONL logs that survive a torn line and are cut
back on resume, plots."""

from __future__ import annotations

import glob
import os

import numpy as np

from zsp_jax.train import events, logs


def test_crc32c_known_values():
    assert events.crc32c(b"") == 0
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert events.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4


def test_event_files_round_trip(tmp_path):
    w = events.EventWriter(str(tmp_path / "tb"), purge_step=7)
    w.scalars(7, {"train/loss": 0.5, "train/lr": 1e-3})
    w.scalars(2**40, {"eval/miou": 61.25})
    w.close()
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    evs = events.read_events(path)
    assert evs[0]["file_version"] == "brain.Event:2"
    assert evs[1]["session_start"] and evs[1]["step"] == 7
    assert evs[2]["step"] == 7 and evs[2]["scalars"] == {"train/loss": 0.5, "train/lr": float(np.float32(1e-3))}
    assert evs[3]["step"] == 2**40 and evs[3]["scalars"] == {"eval/miou": 61.25}
    try:  # an independent decoder of the same protocol buffers, where installed (not a dependency)
        from tensorboardX.proto import event_pb2
    except ImportError:
        event_pb2 = None
    if event_pb2 is not None:
        with open(path, "rb") as f:
            data = f.read()
        pos, parsed = 0, []
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            parsed.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 16 + n
        assert parsed[0].file_version == "brain.Event:2" and parsed[1].session_log.status == 1
        assert parsed[2].step == 7 and parsed[2].summary.value[0].tag == "train/loss"
        assert parsed[2].summary.value[0].simple_value == 0.5 and parsed[3].step == 2**40


def test_run_log_resume_drops_repeated_steps_and_plots(tmp_path):
    work = str(tmp_path)
    log = logs.RunLog(work)
    for step in range(1, 7):
        log.train(step, {"loss": 1.0 / step, "loss_x": 0.5 / step})
    log.eval(4, {"miou": 40.0, "pixel_accuracy": 80.0, "per_class": {"background": 90.0, "cat": None}, "epoch": 1})
    log.close()
    with open(os.path.join(work, logs.TRAIN_LOG), "a") as f:
        f.write('{"step": 7, "loss": 0.1')  # a kill mid-write
    assert [r["step"] for r in logs.read_jsonl(os.path.join(work, logs.TRAIN_LOG))] == [1, 2, 3, 4, 5, 6]
    resumed = logs.RunLog(work, resume_step=4)  # the checkpoint was at step 4: steps 5.. are repeated
    assert [r["step"] for r in logs.read_jsonl(os.path.join(work, logs.TRAIN_LOG))] == [1, 2, 3, 4]
    resumed.train(5, {"loss": 0.2, "loss_x": 0.1})
    resumed.eval(8, {"miou": 50.0, "pixel_accuracy": 85.0, "per_class": {}})
    plots = resumed.plot()
    resumed.close()
    assert [r["miou"] for r in logs.read_jsonl(os.path.join(work, logs.EVAL_LOG))] == [40.0, 50.0]
    for p in plots.values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    files = sorted(glob.glob(os.path.join(work, logs.TB_DIR, "events.out.tfevents.*")))
    assert len(files) == 2
    second = events.read_events(files[1])
    assert second[1]["session_start"] and second[1]["step"] == 5  # TensorBoard drops the first run's 5, 6
    assert second[2]["scalars"]["train/loss"] == float(np.float32(0.2))


def test_run_killed_before_its_first_checkpoint_hides_the_killed_sessions_steps(tmp_path):
    # Resumed at step 0 (no checkpoint yet): the new session's file starts with a session start at step 1,
    # so TensorBoard shows steps 1.. once, not twice.
    work = str(tmp_path)
    killed = logs.RunLog(work)
    for step in range(1, 4):
        killed.train(step, {"loss": 1.0})
    killed.close()
    again = logs.RunLog(work, resume_step=0)
    again.train(1, {"loss": 2.0})
    again.close()
    assert [r["loss"] for r in logs.read_jsonl(os.path.join(work, logs.TRAIN_LOG))] == [2.0]
    files = sorted(glob.glob(os.path.join(work, logs.TB_DIR, "events.out.tfevents.*")))
    second = events.read_events(files[1])
    assert second[1]["session_start"] and second[1]["step"] == 1

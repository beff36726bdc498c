"""The labelling job from the command line: outputs, resume, bad input, a SIGKILL at a random moment,
quality evaluation, the threshold sweep, and the bucket split across processes."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from zsp_jax.amg.geometry import Bucket
from zsp_jax.label.job import split_work
from zsp_jax.references.amg import sample_images
from zsp_jax.models.random_checkpoints import tiny_checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "tiny_label_config.py")
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Checkpoints, a folder of photos (two nested) and a compilation cache shared by the module's runs."""
    base = tmp_path_factory.mktemp("label_job")
    sam, clip = tiny_checkpoints(str(base / "ckpt"))
    images = base / "images"
    (images / "trip").mkdir(parents=True)
    sizes = [(150, 200), (140, 230), (160, 180), (120, 200), (200, 150), (90, 90), (170, 150), (130, 210),
             (180, 160), (100, 140), (150, 150), (210, 120)]
    for i, im in enumerate(sample_images(sizes)):
        Image.fromarray(im).save(images / ("trip" if i % 3 == 0 else "") / f"photo{i:02d}.jpg", quality=92)
    return {"base": base, "sam": sam, "clip": clip, "images": images, "cache": str(base / "jax_cache")}


def _run(env, out, *extra, images=None, timeout=600):
    cmd = [sys.executable, "-m", "zsp_jax.label", "--config", CONFIG, "--images", str(images or env["images"]),
           "--classes", "cat,dog,bird: bird; parrot", "--out", str(out), "--sam", env["sam"], "--clip", env["clip"],
           "--quiet", f"--config.label.compile_cache_dir={env['cache']}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return {e["name"]: e for e in map(json.loads, f)}


def _labels(out):
    found = {}
    for dirpath, _, files in os.walk(os.path.join(out, "labels")):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                found[os.path.relpath(p, os.path.join(out, "labels"))] = fh.read()
    return found


@pytest.fixture(scope="module")
def uninterrupted(env):
    out = env["base"] / "full"
    r = _run(env, out, "--config.label.write_segments=True", "--config.label.write_overlays=True",
             "--config.label.write_confidence=True")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_outputs_manifest_report_and_resume(env, uninterrupted):
    out = uninterrupted
    entries = _manifest(out)
    assert len(entries) == 12 and all(e["status"] == "ok" for e in entries.values())
    # Masks that survived the NMS before the max_masks cap (4 x 4 points, no filters: all 48 = max_masks).
    assert all(e["masks_survived"] == 48 >= e["segments"] for e in entries.values())
    labels = _labels(out)
    assert "trip/photo00.png" in labels and "photo01.png" in labels and len(labels) == 12
    with Image.open(out / "labels" / "trip" / "photo00.png") as im:
        assert im.mode == "P" and im.size == (200, 150)  # palette PNG at the image's size
        values = set(np.unique(np.asarray(im)).tolist())
    assert values <= {0, 1, 2, 3, 255}
    seg = json.loads((out / "segments" / "trip" / "photo00.json").read_text())
    assert seg["height"] == 150 and len(seg["segments"]) > 10
    assert {"segmentation", "class", "similarity", "predicted_iou", "stability_score", "bbox"} <= set(seg["segments"][0])
    assert (out / "overlays" / "trip" / "photo00.jpg").exists() and (out / "confidence" / "photo01.png").exists()
    assert (out / "report.html").read_text().count("<img") >= 12
    classes = json.loads((out / "classes.json").read_text())
    assert classes["names"] == ["background", "cat", "dog", "bird"] and classes["prompts"][3] == ["bird", "parrot"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled_total"] == 12 and summary["this_run"]["stage_seconds"]["write"] > 0
    assert list(summary["this_run"]["programs"]) == ["256x256"]  # every image fits one bucket of 256
    # A rerun finds everything finished: nothing is labelled again, no file is rewritten.
    mtimes = {p: os.stat(out / "labels" / p).st_mtime_ns for p in labels}
    r = _run(env, out, "--config.label.write_segments=True", "--config.label.write_overlays=True",
             "--config.label.write_confidence=True")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "summary.json").read_text())["this_run"]
    assert again["labelled"] == 0 and again["done_before"] == 12
    assert mtimes == {p: os.stat(out / "labels" / p).st_mtime_ns for p in labels}
    # Other settings in the same folder are refused, naming what differs.
    r = _run(env, out, "--config.label.threshold=0.3")
    assert r.returncode == 2 and "other settings" in r.stderr and "options" in r.stderr


def test_bad_and_odd_images_never_stop_the_run(env, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    photo = sample_images([(120, 160)])[0]
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(photo).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((photo[..., 0].astype(np.uint16) * 257)).save(folder / "gray16.png")
    Image.fromarray(photo[:3, :3]).save(folder / "tiny.png")
    big = np.asarray(Image.fromarray(photo).resize((1800, 1350)))
    Image.fromarray(big).save(folder / "large.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    Image.fromarray(photo).save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    r = _run(env, out, images=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = _manifest(out)
    failed = {n for n, e in entries.items() if e["status"] == "failed"}
    assert failed == {"empty.jpg", "truncated.jpg", "notes.png"}, {n: e.get("error") for n, e in entries.items()}
    assert "0 bytes" in entries["empty.jpg"]["error"]
    for name, size in (("cmyk.jpg", (160, 120)), ("rgba.png", (160, 120)), ("gray16.png", (160, 120)),
                       ("tiny.png", (3, 3)), ("large.jpg", (1800, 1350))):
        assert entries[name]["status"] == "ok"
        with Image.open(out / "labels" / (name.rsplit(".", 1)[0] + ".png")) as im:
            assert im.size == size, name
    assert entries["large.jpg"]["work_size"] == [192, 256]  # labelled at max_side, map resized
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_total"] == 3 and len(summary["failures"]) == 3
    assert "3 could not be read" in r.stdout


def test_sigkill_at_a_random_moment_loses_nothing(env, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "zsp_jax.label", "--config", CONFIG, "--images", str(env["images"]),
           "--classes", "cat,dog,bird: bird; parrot", "--out", str(out), "--sam", env["sam"], "--clip", env["clip"],
           "--quiet", f"--config.label.compile_cache_dir={env['cache']}", "--config.label.write_segments=True",
           "--config.label.write_overlays=True", "--config.label.write_confidence=True"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest" / "000-of-001.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))  # mid-image, mid-write or between images
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = manifest.read_text().splitlines() if manifest.exists() else []
    done = {json.loads(line)["name"] for line in lines if line.endswith("}")}
    assert len(done) >= 3 and proc.returncode == -signal.SIGKILL, (len(done), proc.returncode)
    before = {n: os.stat(out / "labels" / (n.rsplit(".", 1)[0] + ".png")).st_mtime_ns for n in done}
    r = _run(env, out, "--config.label.write_segments=True", "--config.label.write_overlays=True",
             "--config.label.write_confidence=True")
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "summary.json").read_text())["this_run"]
    assert run["done_before"] == len(done) and run["labelled"] == 12 - len(done)  # nothing computed twice
    assert before == {n: os.stat(out / "labels" / (n.rsplit(".", 1)[0] + ".png")).st_mtime_ns for n in done}
    assert _labels(out) == _labels(uninterrupted)  # nothing lost: the same maps as a run never killed
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp-")]
    assert leftovers == []


def test_evaluation_and_threshold_sweep_from_segments(env, uninterrupted, tmp_path):
    """Ground truth = a known map per image; the sweep repaints from the segment records, and at the
    run's own threshold it reproduces the run's maps exactly (so the sweep's numbers are the labeller's)."""
    from zsp_jax.label import quality

    out = uninterrupted
    gt_dir = tmp_path / "gt"
    pairs, seg_pairs = [], []
    for rel in _labels(out):
        with Image.open(out / "labels" / rel) as im:
            label = np.asarray(im)
        gt = label.copy()
        gt[: gt.shape[0] // 2] = 1  # top half "cat", bottom half as pseudo-labelled
        gt[0, :] = 255
        (gt_dir / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt).save(gt_dir / rel)
        name = rel[:-4] + ".jpg"
        pairs.append((name, str(out / "labels" / rel), str(gt_dir / rel)))
        seg_pairs.append((name, str(out / "segments" / (rel[:-4] + ".json")), str(gt_dir / rel)))
        rec = json.loads((out / "segments" / (rel[:-4] + ".json")).read_text())
        np.testing.assert_array_equal(quality.repaint(rec, 0.0, 255), label)
    names = ["background", "cat", "dog", "bird"]
    result = quality.evaluate(pairs, names)
    assert result["images"] == 12
    # bottom halves agree exactly, top halves only where the pseudo label says "cat"
    a = result["as_labelled"]
    assert 0 < a["pixel_accuracy"] < 100 and a["coverage"] > 0
    sweep = quality.sweep_thresholds(seg_pairs, [0.0, 0.5, 2.0], names)
    assert sweep[0]["miou"] == pytest.approx(a["miou"])
    assert sweep[2]["coverage"] == pytest.approx(a["coverage"])  # the rule moves classes, not coverage
    # Through the command line: --gt + --eval write eval.json, --sweep a threshold table.
    r = _run(env, out, "--gt", str(gt_dir), "--eval", "--sweep", "0:0.5:0.25", "--config.label.write_segments=True",
             "--config.label.write_overlays=True", "--config.label.write_confidence=True")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["as_labelled"]["miou"] == pytest.approx(a["miou"])
    assert len(json.loads((out / "threshold_sweep.json").read_text())) == 3
    assert "pseudo-label quality on 12 images" in r.stdout and "best threshold" in r.stdout


def test_split_work_deals_buckets_to_processes():
    buckets = {Bucket(64 * (i + 1), 64, 1, 1): [f"b{i}_{j}" for j in range(n)] for i, n in enumerate([40, 9, 7, 3, 1])}
    for count in (1, 2, 3):
        shares = [split_work(buckets, 4, p, count) for p in range(count)]
        flat = [x for share in shares for _, items in share for x in items]
        assert sorted(flat) == sorted(x for v in buckets.values() for x in v)  # every image once
        assert shares == [split_work(buckets, 4, p, count) for p in range(count)]  # deterministic
        loads = [sum(len(items) for _, items in s) for s in shares]
        assert max(loads) - min(loads) <= 40 // count + 4
        for share in shares:  # pieces of a bucket start at group boundaries
            for bucket, items in share:
                first = int(items[0].split("_")[1])
                assert first % 4 == 0
    one, two = split_work(buckets, 4, 0, 2), split_work(buckets, 4, 1, 2)
    small = {b for b, v in buckets.items() if len(v) < 20}
    assert not ({b for b, _ in one} & {b for b, _ in two} & small)  # small buckets compile on one process only

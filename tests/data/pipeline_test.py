import collections
import os

import grain
import jax
import numpy as np
import pytest

from zsp_jax.data import bad_input, device_augment, pipeline, readers, sources, splits
from tests.fixtures import data_files

CROP, BATCH = 48, 4


@pytest.fixture(scope="module")
def split4(voc_root, voc_splits):
    lab, unl = splits.load_split(readers.VocLayout(voc_root), voc_splits, "4")
    return sources.FileSource(lab), sources.FileSource(unl)


def _pipe(split4, **kw):
    args = dict(crop_size=CROP, global_batch_size=BATCH, seed=0, num_classes=21, workers=0, read_threads=1,
                shard=grain.sharding.ShardOptions(0, 1))
    args.update(kw)
    return pipeline.TrainPipeline(*split4, **args)


def _names(pipe, start, count):
    """Record names of this process's local elements start .. start + count (batch-major)."""
    b = pipe.batch_size
    return [tuple(r["name"] for r in pipe.records[pipe.element_index(k // b, k % b)])
            for k in range(start, start + count)]


def test_epochs_follow_unimatch_and_two_processes_cover_every_element_once(split4):
    lab_src, unl_src = split4
    n_l, n_u = len(lab_src), len(unl_src)
    assert (n_l, n_u) == (4, 12)
    shards = [_pipe(split4, shard=grain.sharding.ShardOptions(p, 2)) for p in range(2)]
    per_process = shards[0].steps_per_epoch * shards[0].batch_size
    assert shards[0].steps_per_epoch == n_u // BATCH and shards[0].batch_size == BATCH // 2
    orders = []
    for epoch in range(2):
        elems = sum((_names(s, epoch * per_process, per_process) for s in shards), [])
        unl = [e[1] for e in elems]
        assert sorted(unl) == sorted(unl_src.names)  # every unlabelled image exactly once per epoch
        lab = collections.Counter(e[0] for e in elems)
        assert set(lab) == set(lab_src.names) and set(lab.values()) == {n_u // n_l}  # labelled repeated to n_u
        orders.append(unl)
    assert orders[0] != orders[1]  # a new shuffle each epoch
    # Process p's batch t is rows [p b, (p + 1) b) of the single-process batch t.
    single = _pipe(split4)
    flat = _names(single, 0, 2 * per_process)
    b = shards[1].batch_size
    assert _names(shards[1], 0, per_process) == [flat[t * BATCH + b + i] for t in range(per_process // b)
                                                 for i in range(b)]


def _batches(pipe, n):
    it = iter(pipe)
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_global_batch_is_the_same_for_any_process_and_worker_count(split4):
    """The batches of 2 processes side by side, with 0 or 2 workers, are the single-process batches."""
    single = _batches(_pipe(split4), 4)
    for workers in (0, 2):
        parts = [_batches(_pipe(split4, shard=grain.sharding.ShardOptions(p, 2), workers=workers), 4)
                 for p in range(2)]
        for t in range(4):
            joined = jax.tree.map(lambda *xs: np.concatenate(xs), parts[0][t], parts[1][t])
            _assert_trees_equal(joined, single[t])
    _assert_trees_equal(_batches(_pipe(split4, workers=2), 4), single)


def test_batches_static_shapes_and_finalize(split4):
    pipe = _pipe(split4)
    it = iter(pipe)
    fn = jax.jit(device_augment.finalize)
    for _ in range(4):
        b = next(it)
        assert b["labeled"]["image"].shape == (BATCH, CROP, CROP, 3) and b["labeled"]["image"].dtype == np.uint8
        assert b["labeled"]["mask"].shape == (BATCH, CROP, CROP)
        for k in ("unlabeled", "unlabeled_mix"):
            assert b[k]["image"].shape == (BATCH, CROP, CROP, 3) and b[k]["seed"].dtype == np.uint32
            assert set(np.unique(b[k]["ignore_mask"])) <= {0, 255}
        labels = set(np.unique(b["labeled"]["mask"]).tolist())
        assert labels <= set(range(21)) | {255}
    out = fn(b)
    assert out["unlabeled"]["image_s1"].shape == (BATCH, CROP, CROP, 3)


def test_determinism_under_seed(split4):
    def first(seed):
        return next(iter(_pipe(split4, seed=seed)))
    a, b, c = first(0), first(0), first(1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["labeled"]["image"], c["labeled"]["image"])


def test_mix_stream(split4):
    same = _pipe(split4)
    assert all(len(same.records[k]) == 2 for k in range(3))  # mix = the unlabelled image, re-augmented
    b = next(iter(same))
    assert not np.array_equal(b["unlabeled"]["image"], b["unlabeled_mix"]["image"])
    other = _pipe(split4, mix_same_images=False)
    names = _names(other, 0, 12)
    assert sorted(n[2] for n in names) == sorted(split4[1].names) and [n[1] for n in names] != [n[2] for n in names]


def test_host_strong_views(split4):
    b = next(iter(_pipe(split4, strong_on_host=True)))
    u = b["unlabeled"]
    assert "seed" not in u and u["image_s1"].shape == (BATCH, CROP, CROP, 3) and u["cutmix_box1"].dtype == np.uint8
    out = jax.jit(device_augment.finalize)(b)
    assert out["unlabeled_mix"]["cutmix_box2"].dtype == bool


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resumes_at_the_same_element(split4, tmp_path, workers):
    pipe = _pipe(split4, workers=workers)
    it = iter(pipe)
    for _ in range(3):
        next(it)
    path = str(tmp_path / "state.json")
    pipeline.save_state(it, path)
    expected = [next(it) for _ in range(2)]
    if hasattr(it, "close"):
        it.close()
    resumed = iter(_pipe(split4, workers=workers))
    pipeline.restore_state(resumed, path)
    for want in expected:
        got = next(resumed)
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(x, y)
    if hasattr(resumed, "close"):
        resumed.close()


def test_bad_file_during_training(voc_copy, voc_splits):
    lab, unl = splits.load_split(readers.VocLayout(voc_copy), voc_splits, "4")
    data_files.truncated_jpeg(unl[0].image)  # changed on disk after the start-up check
    srcs = sources.FileSource(lab), sources.FileSource(unl)
    pipe = _pipe(srcs, on_bad_input="skip")
    batches = [next(iter(pipe)) for _ in range(1)] + [b for _, b in zip(range(5), iter(pipe))]
    assert all(b["labeled"]["image"].shape[0] == BATCH for b in batches)  # dropped, batches stay full
    with pytest.raises(bad_input.BadInputError, match=os.path.basename(unl[0].name)):
        for _, _b in zip(range(6), iter(_pipe(srcs, on_bad_input="error"))):
            pass


def test_pipeline_errors(split4):
    with pytest.raises(ValueError, match="train.batch_size"):
        _pipe(split4, global_batch_size=3, shard=grain.sharding.ShardOptions(0, 2))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _pipe(split4, global_batch_size=16)


def test_iterator_state_in_an_orbax_checkpoint(split4, tmp_path):
    """The trainer's Orbax checkpoint can hold the input position next to the weights (maxtext style)."""
    import orbax.checkpoint as ocp

    it = iter(_pipe(split4))
    next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("input",),
                                 item_handlers={"input": grain.checkpoint.CheckpointHandler()})
    mngr.save(1, args=ocp.args.Composite(input=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = next(it)
    resumed = iter(_pipe(split4))
    mngr.restore(1, args=ocp.args.Composite(input=grain.checkpoint.CheckpointRestore(resumed)))
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(next(resumed))):
        np.testing.assert_array_equal(x, y)

"""Automatic program sizes: the largest candidate whose XLA memory estimate fits the stated budget, a clear error
when none fits; the settings' parsing; a mixed-size folder labelled with few programs at native size."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.fixtures.label_options import make_options
from zsp_jax.amg import Bucket
from zsp_jax.utils.memory import GIB, MemoryBudget
from zsp_jax.amg.tuning import AUTO, SizeRequest, Sizes, parse_size
from zsp_jax.label.labeller import Labeller
from zsp_jax.models.random_checkpoints import random_weight_label_config
from zsp_jax.references.amg import sample_images


def _options(**fields):
    config = random_weight_label_config()
    config.amg.points_per_side = 4
    config.amg.max_masks = 48
    for name, value in fields.items():
        config[name] = value
    return make_options(config)


def test_candidates_halve_one_automatic_size_at_a_time():
    limits = Sizes(images_per_device=4, decoder_group=8, mask_chunk=4)
    ladder = SizeRequest().candidates(limits)
    assert [dataclasses.astuple(s) for s in ladder] == [
        (4, 8, 4), (2, 8, 4), (1, 8, 4), (1, 4, 4), (1, 4, 2), (1, 2, 2), (1, 2, 1), (1, 1, 1)]
    fixed = SizeRequest(images_per_device=2, decoder_group=AUTO, mask_chunk=16).candidates(limits)
    assert [dataclasses.astuple(s) for s in fixed] == [(2, 8, 16), (2, 4, 16), (2, 2, 16), (2, 1, 16)]
    assert SizeRequest(1, 2, 3).candidates(limits) == [Sizes(1, 2, 3)]


@pytest.mark.parametrize("value,expected", [("auto", AUTO), (None, AUTO), (0, AUTO), (4, 4), ("16", 16)])
def test_size_fields_accept_auto_and_ints(value, expected):
    assert parse_size("label.mask_chunk", value) == expected


@pytest.mark.parametrize("value", ["big", -1, 1.5, 5000])
def test_bad_size_fields_name_the_field(value):
    with pytest.raises(ValueError, match="label.decoder_group"):
        parse_size("label.decoder_group", value)
    config = random_weight_label_config()
    config.decoder_group = value
    with pytest.raises(ValueError, match="label.decoder_group"):
        make_options(config)


def test_memory_budget_sources():
    cpu = jax.devices()[0]
    stated = MemoryBudget.of_device(cpu, memory_gb=2.5, fraction=0.5)
    assert stated.total == int(2.5 * GIB) and stated.limit == int(1.25 * GIB) and "label.device_memory_gb" in stated.source
    physical = MemoryBudget.of_device(cpu, local_devices=8)
    assert 0 < physical.total * 8 <= 2**50 and "physical memory / 8 devices" in physical.source
    options = _options(device_memory_gb=3.0, memory_fraction=0.6)
    assert (options.device_memory_gb, options.memory_fraction) == (3.0, 0.6)
    assert "device_memory_gb" not in options.fingerprint()  # how fast, not what: a rerun may change it


def test_auto_sizes_take_the_largest_that_fits(sam_pair, clip_pair, one_device_mesh):
    """Candidates are compiled largest first; with a budget just below the largest's estimate, the first smaller
    candidate whose estimate fits is chosen, and every larger one is shown not to fit. A budget below the
    smallest estimate is one ValueError naming the field and that estimate. The chosen program labels images."""
    _, sam = sam_pair
    _, _, clip, tokenizer = clip_pair
    # limits of 2 and 2: a ladder of three programs (each compiled twice below) keeps the test short; the
    # ladder's construction from the CPU's limits is test_candidates_halve_one_automatic_size_at_a_time's
    lab = Labeller(sam, clip, tokenizer, _options(device_memory_gb=64.0), mesh=one_device_mesh,
                   size_limits=Sizes(images_per_device=1, decoder_group=2, mask_chunk=2))
    bucket = Bucket.for_size((150, 200), 64)
    ladder = lab.tuning.candidates(lab.programs.limits)
    assert [dataclasses.astuple(s) for s in ladder] == [(1, 2, 2), (1, 2, 1), (1, 1, 1)]
    estimates = [lab.programs.compile(bucket, sizes)[1] for sizes in ladder]
    assert all(a >= b for a, b in zip(estimates, estimates[1:])) and estimates[-1] > 0, estimates
    # the first candidate that needs less than the largest (halving the mask chunk alone may not, at this size)
    chosen = next(i for i, e in enumerate(estimates) if e < estimates[0])

    lab.programs.budget = MemoryBudget(estimates[-1] - 1, 1.0, "a test", "label.device_memory_gb")
    with pytest.raises(ValueError, match=r"label\.device_memory_gb: no setting fits .* the smallest, 1 image x "
                                         rf"group 1 x chunk 1, needs {estimates[-1] / GIB:.3g} GiB"):
        lab.program(bucket)

    limit = (estimates[0] + estimates[chosen]) // 2
    lab.programs.budget = MemoryBudget(limit, 1.0, "a test", "label.device_memory_gb")
    program = lab.program(bucket)
    assert program.sizes == ladder[chosen] and program.compiles == chosen + 1
    assert program.memory_bytes == estimates[chosen] <= limit < min(estimates[:chosen])  # larger ones do not fit
    described = ladder[chosen].describe()
    assert described in program.describe() and "GiB" in program.describe()
    results = lab.label(sample_images([(150, 200)]))
    assert results[0].label.shape == (150, 200) and results[0].num_segments >= 20


def test_mixed_size_folder_labels_every_image_at_its_size_with_few_programs(sam_pair, clip_pair, one_device_mesh):
    """20 images of 20 sizes (both orientations, up to 400 px) share at most 20 // 8 = 2 programs, and each is
    labelled at its own size with the same labels as on its own padded size's program."""
    _, sam = sam_pair
    _, _, clip, tokenizer = clip_pair
    rng = np.random.default_rng(3)
    sizes = sorted({(int(h), int(w)) for h, w in rng.integers(130, 401, (40, 2))})[:20]
    images = sample_images(sizes)
    lab = Labeller(sam, clip, tokenizer, _options(), mesh=one_device_mesh, images_per_device=1, decoder_group=4,
                   mask_chunk=4)
    assert lab.bucket_min_images == 8  # the CPU's default
    results = lab.label(images)
    assert 1 <= len(lab.programs.programs) <= 2
    for image, result in zip(images, results):
        assert result.label.shape == image.shape[:2] and result.num_segments >= 10
    alone = Labeller(sam, clip, tokenizer, _options(bucket_min_images=1), mesh=one_device_mesh, images_per_device=1,
                     decoder_group=4, mask_chunk=4)
    for i in (0, 19):  # the smallest and the largest image, on their own padded sizes
        own = alone.label([images[i]])[0]
        assert alone.buckets_for([sizes[i]])[0] != lab.buckets_for(sizes)[i]
        assert np.mean(own.label == results[i].label) >= 0.999
        assert own.num_segments == results[i].num_segments

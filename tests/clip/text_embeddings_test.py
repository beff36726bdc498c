"""Class embeddings: templates, the ensemble against open_clip's zero-shot classifier, caching."""

import os

import numpy as np
import pytest

from zsp_jax.models.clip import IMAGENET_TEMPLATES, SINGLE_TEMPLATE, ClassEmbedder, class_embeddings, get_templates
from zsp_jax.models.clip import text_embeddings as TE
from zsp_jax.references.clip import VOC_CLASSES
from zsp_jax.utils.bench import relative_error


def test_templates_are_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert [t.format("dog") for t in IMAGENET_TEMPLATES] == [f("dog") for f in OPENAI_IMAGENET_TEMPLATES]
    assert get_templates("single") == SINGLE_TEMPLATE == ("a photo of a {}.",)
    with pytest.raises(ValueError):
        get_templates(["no placeholder"])
    with pytest.raises(ValueError):
        get_templates("imagenet")


@pytest.mark.parametrize("templates", ["single", "imagenet80"])
def test_matches_open_clip_zero_shot_classifier(tiny_open_clip, open_clip_tokenizer, tokenizer, templates):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch_model, converted = tiny_open_clip
    classes = list(VOC_CLASSES)
    ref = build_zero_shot_classifier(torch_model, open_clip_tokenizer, classes, list(get_templates(templates)),
                                     num_classes_per_batch=None).numpy().T
    ours = ClassEmbedder(converted.build(), tokenizer, batch_size=128)(classes, templates)
    assert ours.shape == (20, 16) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)
    assert relative_error(ours, ref) <= 1e-5


def test_single_template_is_gem_encode_text(tiny_open_clip, open_clip_tokenizer, tokenizer):
    """GEM's GEMWrapper.encode_text: 'a photo of a {}.', L2-normalised."""
    import torch

    torch_model, converted = tiny_open_clip
    with torch.no_grad():
        ref = torch_model.encode_text(open_clip_tokenizer([f"a photo of a {c}." for c in VOC_CLASSES]),
                                      normalize=True).numpy()
    assert relative_error(class_embeddings(converted.build(), tokenizer, VOC_CLASSES), ref) <= 1e-5


def test_memory_and_disk_cache(tmp_path, tiny_open_clip, tokenizer):
    _, converted = tiny_open_clip
    model = converted.build()
    classes = ["cat", "dog", "potted plant"]
    TE._MEMORY.clear()
    first = ClassEmbedder(model, tokenizer, cache_dir=tmp_path)
    a = first(classes, "imagenet80")
    assert first.computed == 240
    b = first(classes, "imagenet80")
    assert first.computed == 240 and np.array_equal(a, b)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("clip_text_") and files[0].endswith(".npz")

    TE._MEMORY.clear()  # a new process: served from disk
    second = ClassEmbedder(model, tokenizer, cache_dir=tmp_path)
    assert np.array_equal(second(classes, "imagenet80"), a) and second.computed == 0

    # another class order, template set or model is another entry
    assert not np.array_equal(second(classes[::-1], "imagenet80"), a)
    assert second.computed == 240
    other_model = converted.build()
    other_model.text.proj.set_value(other_model.text.proj.get_value() * -1)
    third = ClassEmbedder(other_model, tokenizer, cache_dir=tmp_path)
    assert third.checkpoint_id != second.checkpoint_id
    np.testing.assert_allclose(third(classes, "imagenet80"), -a, atol=1e-6)
    assert third.computed == 240


def test_damaged_cache_entry_is_recomputed(tmp_path, tiny_open_clip, tokenizer):
    _, converted = tiny_open_clip
    model = converted.build()
    TE._MEMORY.clear()
    emb = ClassEmbedder(model, tokenizer, cache_dir=tmp_path)
    a = emb(["cat"])
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    path.write_bytes(path.read_bytes()[:20])
    TE._MEMORY.clear()
    again = ClassEmbedder(model, tokenizer, cache_dir=tmp_path)
    np.testing.assert_array_equal(again(["cat"]), a)
    assert again.computed == 1

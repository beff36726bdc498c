"""Token ids against open_clip's SimpleTokenizer (GEM's) and transformers' CLIPTokenizer."""

import numpy as np
import pytest

from zsp_jax.models.clip import IMAGENET_TEMPLATES, ClipTokenizer
from zsp_jax.models.clip.tokenizer import bytes_to_unicode, vocabulary_from_bpe
from zsp_jax.references.clip import COCO_CLASSES, VOC_CLASSES

HARD_TEXTS = [
    "A PHOTO of a Pottedplant!!", "tv/monitor", "dining-table 12,345 3.5", "it's what we'll do, they've said",
    "Café naïve résumé Ångström", "ΟΔΟΣ ΣΟΦΙΑ", "“quoted” ‘text’", "fish &amp; chips &lt;3", "ﬁsh ﬂower",
    "ＣＡＴ ｄｏｇ", "🐱 猫 ねこ 고양이", "  many\t spaces\n here  ", "x" * 300, "a " * 100, "",
    "Ünïcödé\u0301",
    "hair drier; teddy-bear: (small) [big] {x}",
]


def _prompts():
    classes = list(VOC_CLASSES) + list(COCO_CLASSES)
    return [t.format(c) for c in classes for t in IMAGENET_TEMPLATES[:: 8]] + [f"a photo of a {c}." for c in classes]


def test_vocabulary_layout(tokenizer):
    import open_clip.tokenizer as oct

    assert bytes_to_unicode() == oct.bytes_to_unicode()
    assert list(bytes_to_unicode().values()) == list(oct.bytes_to_unicode().values())
    vocab, merges = vocabulary_from_bpe(oct.default_bpe())
    ref = oct.SimpleTokenizer()
    assert len(vocab) == 49408 and (tokenizer.sot_id, tokenizer.eot_id) == (49406, 49407)
    special = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    assert {special.get(k, k): v for k, v in vocab.items()} == ref.encoder


def test_ids_equal_open_clip(tokenizer, open_clip_tokenizer):
    texts = _prompts() + HARD_TEXTS
    ours = tokenizer(texts)
    ref = open_clip_tokenizer(texts).numpy()
    assert ours.dtype == np.int32 and ours.shape == ref.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, bad[:5]


def test_known_ids(tokenizer):
    assert tokenizer("a photo of a cat.")[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0]


def test_truncation(tokenizer, open_clip_tokenizer):
    ids = tokenizer(["word " * 200], context_length=77)[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()
    np.testing.assert_array_equal(ids, open_clip_tokenizer(["word " * 200])[0].numpy())
    assert tokenizer(["a cat"], context_length=16).shape == (1, 16)


def test_ids_equal_transformers(tokenizer):
    """clean='hf' reproduces transformers' CLIPTokenizer (ids up to its end-of-text)."""
    hf_mode = ClipTokenizer.load(clean="hf")
    hf = tokenizer._hf
    texts = _prompts()[:200] + HARD_TEXTS
    ours = hf_mode(texts)
    for text, row in zip(texts, ours):
        ref = hf(text, truncation=True, max_length=77)["input_ids"]
        assert row[: len(ref)].tolist() == ref, text
        assert (row[len(ref):] == 0).all()


def test_cleaning_modes_differ_only_where_ftfy_acts(tokenizer):
    hf_mode = ClipTokenizer.load(clean="hf")
    texts = _prompts()[:100]
    np.testing.assert_array_equal(tokenizer(texts), hf_mode(texts))
    assert not np.array_equal(tokenizer(["fish &amp; chips"]), hf_mode(["fish &amp; chips"]))


def test_save_and_reload(tmp_path, tokenizer, tiny_hf):
    tokenizer.save_pretrained(tmp_path / "tok")
    again = ClipTokenizer.load(tmp_path / "tok")
    texts = _prompts()[:50] + HARD_TEXTS
    np.testing.assert_array_equal(again(texts), tokenizer(texts))
    # and the directory is a valid transformers tokenizer
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert hf("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ClipTokenizer.load(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipTokenizer.load(tmp_path)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="bad.txt.gz"):
        ClipTokenizer.load(bad)
    with pytest.raises(ValueError):
        ClipTokenizer.load(clean="nope")

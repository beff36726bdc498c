"""CLIP's byte-level BPE tokenizer, offline, with ids identical to the reference tokenizers.

The BPE itself is transformers' ``CLIPTokenizer`` (backed by the Rust ``tokenizers`` library,
fast on long class lists); we only supply its vocabulary and the text cleaning:

* vocabulary: a transformers CLIP directory (``vocab.json`` + ``merges.txt``, or
  ``tokenizer.json``), or OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, which OpenAI's ``clip``
  and ``open_clip`` ship as package data. The project ships no vocabulary file of its own:
  ``ClipTokenizer.load()`` finds one that is installed (see ``find_vocabulary``) and
  ``save_pretrained`` writes it next to converted weights for machines without those packages.
* cleaning ``clean="openai"`` (default): what OpenAI CLIP, open_clip and GEM do before BPE
  (``ftfy.fix_text``, HTML unescaping twice, whitespace collapsed, lower case), so ids equal
  open_clip's ``SimpleTokenizer`` on any text. ``clean="hf"``: no extra cleaning, ids equal
  transformers' ``CLIPTokenizer`` (which only NFC-normalises, collapses whitespace and lowers).
  The two differ only on text that ftfy or HTML unescaping change (curly quotes, ``&amp;``,
  ligatures, mojibake); without ftfy installed, ``openai`` falls back to HTML unescaping and
  NFC, which differs from the reference only on such text.

Output ids are padded with 0 after the end-of-text token, as OpenAI and open_clip do (HF pads
with end-of-text); the text tower pools at the first end-of-text token, so both paddings
give the same embeddings.
"""

from __future__ import annotations

import glob
import gzip
import html
import importlib.util
import json
import os
import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsp_jax.utils.io import atomic_path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses out of the BPE file (48894)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by CLIP's byte-level BPE.

    Printable Latin-1 bytes keep their code point; the others (controls, space, ...) are mapped,
    in byte order, onto code points 256, 257, ...
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(keep)]
    # Dict order matters: it is the order of the first 256 vocabulary ids.
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def vocabulary_from_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab {token: id}, merges) of CLIP from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

    Ids: the 256 byte characters, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    try:
        lines = gzip.open(os.fspath(path)).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CLIP BPE file (truncated?): {e}") from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} BPE merges, found {len(merges)} well-formed lines")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _package_file(package: str, name: str) -> str | None:
    """A data file of an installed package, located without importing it (open_clip imports torch)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    return None


def find_vocabulary() -> str | None:
    """An installed CLIP vocabulary: open_clip's or OpenAI clip's BPE file, else a cached HF CLIP."""
    for pkg in ("open_clip", "clip"):
        p = _package_file(pkg, BPE_FILENAME)
        if p:
            return p
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except Exception:  # noqa: BLE001
        cache = os.path.expanduser("~/.cache/huggingface/hub")
    for d in sorted(glob.glob(os.path.join(cache, "models--openai--clip-vit-*", "snapshots", "*"))):
        if _is_hf_tokenizer_dir(d):
            return d
    return None


def _is_hf_tokenizer_dir(d: str) -> bool:
    return os.path.isdir(d) and (os.path.exists(os.path.join(d, "tokenizer.json")) or (
        os.path.exists(os.path.join(d, "vocab.json")) and os.path.exists(os.path.join(d, "merges.txt"))))


_FTFY_WARNED = False


def _clean_openai(text: str) -> str:
    global _FTFY_WARNED
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        if not _FTFY_WARNED:
            warnings.warn("ftfy is not installed: CLIP token ids may differ from OpenAI/open_clip on text with "
                          "curly quotes, ligatures or mojibake (pip install ftfy)", stacklevel=3)
            _FTFY_WARNED = True
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP tokenizer: text -> (N, context_length) int32 ids.

    Build it with ``ClipTokenizer.load(source)``. Ids: 49406 start-of-text, BPE tokens,
    49407 end-of-text, then 0 padding; a text longer than the context is cut and its last id
    set to end-of-text (as OpenAI / open_clip).
    """

    def __init__(self, hf_tokenizer: Any, *, context_length: int = 77, clean: str = "openai", source: str = ""):
        if clean not in ("openai", "hf"):
            raise ValueError(f"clean must be 'openai' or 'hf', got {clean!r}")
        self._hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        self.context_length = context_length
        self.clean = clean
        self.source = source
        vocab = hf_tokenizer.get_vocab()
        if SOT_TOKEN not in vocab or EOT_TOKEN not in vocab:
            raise ValueError(f"{source}: the vocabulary has no {SOT_TOKEN} / {EOT_TOKEN} (not a CLIP tokenizer)")
        self.sot_id = vocab[SOT_TOKEN]
        self.eot_id = vocab[EOT_TOKEN]
        self.vocab_size = len(vocab)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, source: str | os.PathLike | None = None, *, context_length: int = 77,
             clean: str = "openai") -> ClipTokenizer:
        """Builds the tokenizer offline.

        Args:
          source: a transformers CLIP directory (``vocab.json`` + ``merges.txt`` or
            ``tokenizer.json``; e.g. the model directory ``tools/convert_clip.py`` read, or the
            ``*_tokenizer`` directory it writes), or a ``bpe_simple_vocab_16e6.txt.gz`` file;
            None = ``find_vocabulary()``.
          context_length: ids per text (77 for every CLIP checkpoint).
          clean: 'openai' (ids as OpenAI / open_clip / GEM) or 'hf' (ids as transformers).
        """
        from transformers import CLIPTokenizer

        if source is None:
            source = find_vocabulary()
            if source is None:
                raise FileNotFoundError(
                    "no CLIP vocabulary found: pass a transformers CLIP directory or OpenAI's "
                    f"{BPE_FILENAME} (it ships with `pip install --no-deps open-clip-torch`)")
        source = os.fspath(source)
        if os.path.isdir(source):
            if not _is_hf_tokenizer_dir(source):
                raise FileNotFoundError(f"{source}: no vocab.json + merges.txt or tokenizer.json")
            hf = CLIPTokenizer.from_pretrained(source)
        elif os.path.exists(source):
            vocab, merges = vocabulary_from_bpe(source)
            hf = CLIPTokenizer(vocab=vocab, merges=merges)
        else:
            raise FileNotFoundError(f"CLIP vocabulary not found: {source}")
        return cls(hf, context_length=context_length, clean=clean, source=source)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``vocab.json`` and ``merges.txt`` (transformers' CLIP layout), atomically."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        model = json.loads(self._backend.to_str())["model"]
        vocab, merges = model["vocab"], model["merges"]
        with atomic_path(os.path.join(directory, "vocab.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with atomic_path(os.path.join(directory, "merges.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("\n".join(m if isinstance(m, str) else " ".join(m) for m in merges) + "\n")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.clean == "openai":
            texts = [_clean_openai(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Texts -> (N, context_length) int32 ids (start, BPE, end, zero padding)."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), np.int32)
        for i, ids in enumerate(self.encode_batch(texts)):
            row = [self.sot_id, *ids, self.eot_id]
            if len(row) > length:
                row = row[:length]
                row[-1] = self.eot_id
            out[i, :len(row)] = row
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, for inspection: the text between start- and end-of-text (id 0 is the real
        token "!", so padding is recognised by position, after the end-of-text token)."""
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        return self._hf.decode([i for i in ids if i != self.sot_id])

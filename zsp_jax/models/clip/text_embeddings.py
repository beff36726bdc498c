"""Class embeddings for zero-shot labelling: prompt templates, ensembling, caching.

``ClassEmbedder(model, tokenizer)(classnames, templates)`` returns a (C, D) float32 matrix of
L2-normalised class embeddings, computed as CLIP's zero-shot recipe does: every class name is
put into every template, each prompt embedding is L2-normalised, the T prompt embeddings of a
class are averaged and the mean is L2-normalised again (with one template this is just the
normalised prompt embedding, as GEM's ``encode_text``).

It is computed once per (checkpoint, class list, templates, tokenizer cleaning) and cached in
memory (for the process) and, with ``cache_dir``, on disk as ``.npz`` written atomically. The
checkpoint is identified by ``checkpoint_id`` or, by default, by a hash of the text tower's
weights and config, so a cache entry can never be served for another model.

Prompts are encoded in fixed-size batches, cut to the longest prompt rounded up to a multiple
of 8 tokens (exact: the text tower is causal and pools at the end-of-text token); for short
class prompts this is several times faster than the full 77-token context (``tools/bench_clip.py
--text``; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from zsp_jax.models.clip.model import ClipModel, encode_text_fn
from zsp_jax.models.clip.templates import get_templates
from zsp_jax.models.clip.tokenizer import ClipTokenizer
from zsp_jax.utils.io import atomic_path

_MEMORY: dict[str, np.ndarray] = {}
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_tower_fingerprint(model: ClipModel) -> str:
    """sha256 (hex, 16 chars) of the text tower's weights and the config.

    Remembered per model object (hashing a ViT-L/14 text tower takes about a second); after
    changing a model's weights in place, pass ``checkpoint_id`` to ``ClassEmbedder`` instead.
    """
    if model in _FINGERPRINTS:
        return _FINGERPRINTS[model]
    h = hashlib.sha256(model.config.to_json().encode())
    state = nnx.state(model.text, nnx.Param)
    for path, var in sorted(nnx.to_flat_state(state), key=lambda pv: str(pv[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(var.get_value()))).tobytes())
    _FINGERPRINTS[model] = h.hexdigest()[:16]
    return _FINGERPRINTS[model]


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClassEmbedder:
    """Computes and caches (C, D) L2-normalised class embeddings.

    Args:
      model: a ClipModel (its text tower is used).
      tokenizer: the checkpoint's ClipTokenizer.
      checkpoint_id: names the weights in cache keys; default ``text_tower_fingerprint``.
      cache_dir: if given, embeddings are also stored there (``clip_text_<key>.npz``).
      batch_size: prompts per text-tower call (one compiled shape per 8-token length bucket).
    """

    def __init__(self, model: ClipModel, tokenizer: ClipTokenizer, *, checkpoint_id: str | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self._checkpoint_id = checkpoint_id
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self._encode = None
        self.computed = 0  # prompts encoded by this embedder (cache misses), for tests and logs

    @property
    def checkpoint_id(self) -> str:
        if self._checkpoint_id is None:
            self._checkpoint_id = text_tower_fingerprint(self.model)
        return self._checkpoint_id

    def cache_key(self, classnames: Sequence[str], templates: Sequence[str]) -> str:
        payload = json.dumps({"checkpoint": self.checkpoint_id, "classes": list(classnames),
                              "templates": list(templates), "clean": self.tokenizer.clean,
                              "context": self.tokenizer.context_length}, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def __call__(self, classnames: Sequence[str], templates: str | Sequence[str] = "single") -> np.ndarray:
        """Class names (C,) and templates ('single', 'imagenet80' or ``{}`` strings) -> (C, D) float32.

        Rows are unit-norm; row i belongs to ``classnames[i]``.
        """
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise ValueError("empty class list")
        templates = get_templates(templates)
        key = self.cache_key(classnames, templates)
        if key in _MEMORY:
            return _MEMORY[key].copy()
        path = os.path.join(self.cache_dir, f"clip_text_{key}.npz") if self.cache_dir else None
        emb = self._read(path, classnames, templates) if path else None
        if emb is None:
            emb = self._compute(classnames, templates)
            if path:
                self._write(path, emb, classnames, templates)
        _MEMORY[key] = emb
        return emb.copy()

    def _compute(self, classnames: list[str], templates: tuple[str, ...]) -> np.ndarray:
        prompts = [t.format(c) for c in classnames for t in templates]
        ids = self.tokenizer(prompts)
        eot = np.argmax(ids, axis=1)
        length = min(int(np.ceil((eot.max() + 1) / 8) * 8), ids.shape[1])
        ids = ids[:, :length]
        if self._encode is None:
            self._encode = encode_text_fn(self.model)
        out = []
        bs = min(self.batch_size, len(ids))
        for start in range(0, len(ids), bs):
            chunk = ids[start:start + bs]
            pad = bs - len(chunk)
            if pad:  # keep one compiled shape; padded rows are dropped below
                chunk = np.concatenate([chunk, np.zeros((pad, length), ids.dtype)])
            out.append(np.asarray(jax.device_get(self._encode(chunk)), np.float32)[:bs - pad])
        self.computed += len(prompts)
        emb = _l2(np.concatenate(out).astype(np.float64))
        emb = _l2(emb.reshape(len(classnames), len(templates), -1).mean(axis=1))
        return emb.astype(np.float32)

    def _read(self, path: str, classnames: list[str], templates: tuple[str, ...]) -> np.ndarray | None:
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                ok = (list(z["classnames"]) == classnames and tuple(z["templates"]) == templates
                      and str(z["checkpoint_id"]) == self.checkpoint_id)
                return np.array(z["embeddings"], np.float32) if ok else None
        except Exception:  # noqa: BLE001 - a damaged entry (BadZipFile, EOFError, ...) is recomputed
            return None

    def _write(self, path: str, emb: np.ndarray, classnames: list[str], templates: tuple[str, ...]) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, embeddings=emb, classnames=np.array(classnames), templates=np.array(templates),
                     checkpoint_id=np.array(self.checkpoint_id))


def class_embeddings(model: ClipModel, tokenizer: ClipTokenizer, classnames: Sequence[str],
                     templates: str | Sequence[str] = "single", **kwargs: Any) -> np.ndarray:
    """Functional form of ``ClassEmbedder(model, tokenizer, **kwargs)(classnames, templates)``."""
    return ClassEmbedder(model, tokenizer, **kwargs)(classnames, templates)

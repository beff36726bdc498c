"""Checks every example once, before any batch is made, so that no run dies mid-way on a bad file.

Each image (and mask) is fully decoded with the same code the pipeline uses, and the checks of
``zsp_jax.data.decode`` run: missing, empty, truncated or undecodable files, colour masks,
label values outside the class range, masks whose size differs from the image. Decoding runs
in a thread pool (PIL releases the GIL while decoding). Results can be cached in a JSON file
keyed by each file's (path, size, mtime), so a second run over unchanged files costs a
``stat`` per file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from zsp_jax.data import decode
from zsp_jax.data.bad_input import BadInputError, Problem
from zsp_jax.data.readers import Example
from zsp_jax.utils import io

_CACHE_VERSION = 1


@dataclasses.dataclass
class ScanResult:
    """``good``: usable examples in input order; ``problems``: one per bad example; ``sizes``: (H, W) per
    good example name (after EXIF orientation where applied)."""

    good: list[Example]
    problems: list[Problem]
    sizes: dict[str, tuple[int, int]]


def check_example(ex: Example, num_classes: int | None, exif: bool) -> tuple[int, int]:
    """Decodes ``ex`` fully and runs every check; returns the image (H, W). Raises ``BadInputError``."""
    if not os.path.isfile(ex.image):
        raise BadInputError(ex.image, "listed but missing")
    if ex.mask is not None and not os.path.isfile(ex.mask):
        raise BadInputError(ex.mask, f"mask of {ex.name} listed/expected but missing")
    image_data, mask_data = ex.read_bytes()
    image, _ = decode.decode_pair(image_data, mask_data, ex.image, ex.mask or "", exif=exif,
                                  num_classes=num_classes)
    return int(image.shape[0]), int(image.shape[1])


def _stat_key(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_key(ex: Example, num_classes: int | None, exif: bool, kind: str) -> str:
    key = [ex.image, ex.mask, _stat_key(ex.image), _stat_key(ex.mask), num_classes, exif]
    return json.dumps(key if kind == "example" else key + [kind])


Check = Callable[[Example, "int | None", bool], tuple[int, int]]


def scan_examples(examples: Sequence[Example], *, num_classes: int | None, exif: bool = False,
                  threads: int | None = None, cache_path: str | None = None,
                  progress: Callable[[int], None] | None = None, check: Check = check_example,
                  kind: str = "example") -> ScanResult:
    """Validates ``examples``; returns the good ones, the problems and the image sizes.

    Args:
      examples: what to check (labelled examples carry a mask path).
      num_classes: masks must hold values in ``[0, num_classes)`` or 255; None skips that check.
      exif: decode images with their EXIF orientation applied (plain folders).
      threads: decoding threads (default: the number of CPU cores).
      cache_path: a JSON file that remembers earlier results of unchanged files.
      progress: called with the number of examples finished since the last call.
      check: ``(example, num_classes, exif) -> (H, W)``, raising ``BadInputError``; default
        ``check_example`` (full decode of image and mask).
      kind: names ``check`` in the cache, so that different checks of the same files do not
        share results.
    """
    cache: dict[str, list] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                blob = json.load(f)
            if blob.get("version") == _CACHE_VERSION:
                cache = blob["entries"]
        except (OSError, ValueError, KeyError):
            cache = {}
    keys = [_cache_key(e, num_classes, exif, kind) for e in examples]
    results: list[tuple[int, int] | str | None] = [None] * len(examples)
    todo = []
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            results[i] = tuple(hit) if isinstance(hit, list) else hit
        else:
            todo.append(i)
    if progress and len(examples) - len(todo):
        progress(len(examples) - len(todo))

    def work(i: int) -> tuple[int, tuple[int, int] | str, str]:
        ex = examples[i]
        try:
            return i, check(ex, num_classes, exif), ""
        except BadInputError as e:
            return i, e.reason, e.path

    paths: dict[int, str] = {}
    if todo:
        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            for i, res, path in pool.map(work, todo):
                results[i] = res
                if path:
                    paths[i] = path
                if progress:
                    progress(1)
    good, problems, sizes = [], [], {}
    for i, (ex, res) in enumerate(zip(examples, results)):
        if isinstance(res, str):
            # A cached failure stores "path\treason".
            path, _, reason = (paths[i] + "\t" + res if i in paths else res).partition("\t")
            problems.append(Problem(ex.name, path, reason))
            results[i] = f"{path}\t{reason}"
        else:
            good.append(ex)
            sizes[ex.name] = res
    if cache_path and todo:
        cache.update({k: (list(r) if isinstance(r, tuple) else r) for k, r in zip(keys, results)})
        io.write_json_atomic(cache_path, {"version": _CACHE_VERSION, "entries": cache}, indent=None)
    return ScanResult(good, problems, sizes)

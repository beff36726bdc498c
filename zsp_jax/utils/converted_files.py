"""PyTorch weight files converted once to ``.safetensors`` and reused while their source is unchanged.

The labeller's SAM and CLIP files (``zsp_jax.label.model_files``) and the trainers' pretrained encoders
(``zsp_jax.train.state`` / ``v2_state``) are converted on first use into a cache folder, so that a later run,
or a resume, needs neither torch nor the conversion's time. A conversion records its source's absolute path,
size and modification time in ``<converted>.source.json``; a source replaced under the same name is converted
again instead of silently training from, or labelling with, the old weights. The converted file is written
atomically by the caller's ``convert``, and the record only after it, so a kill leaves either nothing or a
whole file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from zsp_jax.utils import io

RECORD_SUFFIX = ".source.json"


def converted_path(source: str, cache_dir: str) -> str:
    """Where ``source`` (a file, or a transformers directory) lands: ``<cache_dir>/<stem>.safetensors``."""
    base = os.path.basename(os.path.normpath(source))
    stem = base if os.path.isdir(source) else os.path.splitext(base)[0]
    return os.path.join(cache_dir, stem + ".safetensors")


def _source_record(source: str) -> dict[str, Any]:
    stat = os.stat(source)
    return {"source": os.path.abspath(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_up_to_date(converted: str, source: str) -> bool:
    """True when ``converted`` exists and was converted from ``source`` as it is now.

    A converted file without a record (written before records were kept, or by a conversion killed between
    the file and its record) is taken as up to date: the file itself is complete (written atomically), and
    converting again would need torch on a machine that may only have the converted file.
    """
    if not os.path.isfile(converted):
        return False
    try:
        with open(converted + RECORD_SUFFIX, encoding="utf-8") as f:
            return json.load(f) == _source_record(source)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # an unreadable record: convert again, which rewrites it
        return False


def convert_once(source: str, converted: str, convert: Callable[[str], None], *,
                 log: Callable[[str], Any] = print) -> str:
    """``converted``, written by ``convert(converted)`` unless it already holds ``source`` as it is now.

    Args:
      source: the PyTorch file or directory.
      converted: the ``.safetensors`` path to write (``converted_path``'s, or the caller's own).
      convert: writes the converted weights to the path it is given (atomically; it raises on a bad source,
        and the caller turns that into its own message).
      log: receives one line when a conversion starts.
    Returns:
      ``converted``.
    """
    if is_up_to_date(converted, source):
        return converted
    log(f"converting {source} to {converted} (once; reused while the source is unchanged) ...")
    convert(converted)
    io.write_json_atomic(converted + RECORD_SUFFIX, _source_record(source))
    return converted

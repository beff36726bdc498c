"""File writing that never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success renames it onto ``path``.

    The rename is atomic on POSIX file systems, so readers (and a job resumed after a kill)
    see either the old file or the complete new one. On error the temporary file is removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=kwargs.pop("indent", 2), **kwargs) + "\n")


def output_path_problem(source: str | os.PathLike, out: str | os.PathLike) -> str | None:
    """Why a converter must not write ``out`` for ``source`` (it is the source, or a directory), or None."""
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(source, out):
        return f"the output {out} is the source checkpoint; it would be overwritten"
    if os.path.isdir(out):
        return f"the output {out} is a directory; give a file path ending in .safetensors"
    return None

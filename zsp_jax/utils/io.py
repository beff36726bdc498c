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


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be written in the directory ``path`` (created if missing), or None.

    Checked by writing and removing a small file: permissions, read-only file systems and a full
    disk all show up, before any long work starts."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return f"cannot write in {path}: {e.strerror or e}"
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a result file cannot be written at ``path`` (a directory there, or its folder not writable), or None."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        return f"{path} is a directory; give a file path"
    return writable_dir_problem(os.path.dirname(path))

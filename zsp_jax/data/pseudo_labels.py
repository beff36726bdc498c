"""Where pseudo-label maps live, shared by the labeller (writer) and the trainer (reader).

The labeller writes one palette PNG per image (``decode.encode_png`` with the VOC palette,
class indices, 255 = ignore) at ``<labels_dir>/<relpath>``, where ``relpath`` is the image's
``Example.name`` with its extension replaced by ``.png``: ``JPEGImages/2007_000033.jpg`` ->
``JPEGImages/2007_000033.png``; a user folder's ``trip/day1/img.JPG`` -> ``trip/day1/img.png``.
Two images whose names differ only by extension would share a map; ``check_unique`` refuses
such a list up front, naming the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def label_relpath(name: str, suffix: str = ".png") -> str:
    """The pseudo-label map's path relative to the labels folder, for an image ``name`` (POSIX form)."""
    stem, _ = os.path.splitext(name.replace(os.sep, "/"))
    if not stem or stem.startswith("/") or ".." in stem.split("/"):
        raise ValueError(f"image name {name!r} cannot be mapped inside a labels folder")
    return stem + suffix


def check_unique(names: Iterable[str]) -> None:
    """Raises ``ValueError`` listing names that map to the same label file (e.g. ``a.jpg`` and ``a.png``)."""
    seen: dict[str, str] = {}
    clashes = []
    for n in names:
        rel = label_relpath(n)
        if rel in seen:
            clashes.append(f"{seen[rel]} and {n} -> {rel}")
        else:
            seen[rel] = n
    if clashes:
        raise ValueError(f"{len(clashes)} pair(s) of images would share a pseudo-label file (rename one of each): "
                         + "; ".join(clashes[:10]))

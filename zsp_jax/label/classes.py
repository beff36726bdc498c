"""Class lists of the zero-shot labeller: label values, display names and CLIP prompts.

Label value 0 is always background, 1..N the classes in the order given, 255 = ignore (so at
most 254 values). A class has one or more prompt names (synonyms); each is put into every
template (``label.templates``) and embedded by CLIP once per class list.

Sources (``label.classes`` / ``--classes``):

* ``voc``: PASCAL VOC's 20 classes (``zsp_jax.data.classes``; ``tv/monitor`` is prompted as
  ``tv monitor``), label values as in the dataset;
* ``coco``: COCO's 80 thing classes in UniMatch's order (values 1..80);
* a comma-separated list: ``cat,dog,traffic cone``;
* a text file, one class per line, optionally with its prompts after a colon, separated by
  semicolons; ``#`` starts a comment; a line named ``background`` gives background prompts
  (a segment that matches them best is labelled background)::

      # my classes
      cat
      tvmonitor: tv monitor; television; computer monitor
      background: sky; wall; floor; road

Empty lists, empty names or prompts, duplicate class names and prompts shared by two classes
are errors that name the culprit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from zsp_jax.data.classes import COCO_CLASSES, VOC_CLASSES

BACKGROUND = "background"
MAX_CLASSES = 254  # values 1..254; 255 is the ignore label


@dataclasses.dataclass(frozen=True)
class ClassList:
    """Label values with their names and prompts.

    Attributes:
      names: (N + 1,) display names; ``names[0] == "background"``.
      prompts: (N + 1,) tuples of prompt names per label value; ``prompts[0]`` holds the
        background prompts (often none).
      source: where the list came from (``voc``, ``coco``, a file path, ``inline``).
    """

    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    source: str

    @property
    def num_labels(self) -> int:
        """Label values including background (N + 1)."""
        return len(self.names)

    def prompt_rows(self) -> tuple[list[str], np.ndarray]:
        """(every prompt name, (P,) int32 label value of each), background prompts first."""
        texts, labels = [], []
        for value, prompts in enumerate(self.prompts):
            texts += list(prompts)
            labels += [value] * len(prompts)
        return texts, np.asarray(labels, np.int32)

    def to_json(self) -> dict:
        return {"source": self.source, "names": list(self.names), "prompts": [list(p) for p in self.prompts]}


def _prompt_name(name: str) -> str:
    return name.replace("/", " ")


def _builtin(names: Sequence[str], source: str) -> ClassList:
    return ClassList(tuple(names), ((),) + tuple((_prompt_name(n),) for n in names[1:]), source)


def _parse_lines(lines: Sequence[tuple[int, str]], where: str) -> ClassList:
    names, prompts = [BACKGROUND], [()]
    seen_names: dict[str, int] = {}
    seen_prompts: dict[str, str] = {}
    background_given = False
    for lineno, raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"{where}:{lineno}: empty class name in {raw.strip()!r}")
        entry = tuple(p.strip() for p in rest.split(";")) if sep else (_prompt_name(name),)
        if any(not p for p in entry):
            raise ValueError(f"{where}:{lineno}: empty prompt in {raw.strip()!r} (prompts are separated by ';')")
        key = name.lower()
        if key == BACKGROUND:
            if background_given:
                raise ValueError(f"{where}:{lineno}: background prompts given twice")
            if not sep:
                raise ValueError(f"{where}:{lineno}: a 'background' line needs prompts ('background: sky; wall')")
            background_given = True
            value = 0
        elif key in seen_names:
            raise ValueError(f"{where}:{lineno}: duplicate class {name!r} (first on line {seen_names[key]})")
        else:
            seen_names[key] = lineno
            value = len(names)
            names.append(name)
            prompts.append(())
        for p in entry:
            owner = seen_prompts.get(p.lower())
            if owner is not None:
                raise ValueError(f"{where}:{lineno}: prompt {p!r} of {name!r} is already a prompt of {owner!r}")
            seen_prompts[p.lower()] = name
        prompts[value] = prompts[value] + entry
    if len(names) == 1:
        raise ValueError(f"{where}: no classes (one class name per line; '#' starts a comment)")
    if len(names) - 1 > MAX_CLASSES:
        raise ValueError(f"{where}: {len(names) - 1} classes; at most {MAX_CLASSES} fit in a uint8 label map "
                         "with 0 = background and 255 = ignore")
    return ClassList(tuple(names), tuple(prompts), where)


def read_text_lines(path: str) -> list[str]:
    """The lines of a text file in UTF-8 (with or without BOM) or UTF-16 (with its BOM, as some Windows
    editors save); ``ValueError`` naming the file for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding).splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"class file {path}: not UTF-8 or UTF-16 text ({e.reason} at byte {e.start}); save it as "
                         f"UTF-8") from None


def load_classes(spec: str) -> ClassList:
    """``voc`` | ``coco`` | ``a,b,c`` | path to a class file -> ``ClassList`` (see the module docstring)."""
    spec = str(spec).strip()
    if spec == "voc":
        return _builtin(VOC_CLASSES, "voc")
    if spec == "coco":
        return _builtin(COCO_CLASSES, "coco")
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return _parse_lines(list(enumerate(read_text_lines(path), start=1)), path)
    if "," in spec:
        return _parse_lines([(i + 1, item) for i, item in enumerate(spec.split(","))], "inline class list")
    raise ValueError(f"classes {spec!r}: not 'voc', 'coco', a comma-separated list or an existing class file")

"""Bad input: one exception type that names the file, and the report of files that were skipped.

The policy (``config.data.on_bad_input``) is ``"error"`` (stop at start-up with every bad file
listed) or ``"skip"`` (leave the bad examples out and write a report). Files are checked once,
before any batch is made (``zsp_jax.data.scan``), so a run never dies mid-way on a bad file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from zsp_jax.config_utils import check_choice
from zsp_jax.utils import io

POLICIES = ("error", "skip")


class BadInputError(ValueError):
    """An input file that cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad example: its name (as in the split file), the offending file and why."""

    name: str
    path: str
    reason: str


def raise_for(problems: Iterable[Problem], what: str, limit: int = 20) -> None:
    """Raises ``BadInputError`` listing (up to ``limit``) problems; does nothing if there are none."""
    problems = list(problems)
    if not problems:
        return
    lines = [f"  {p.path}: {p.reason}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    msg = (f"{len(problems)} bad input file(s) in {what} (set config.data.on_bad_input='skip' to leave "
           f"them out):\n" + "\n".join(lines))
    raise BadInputError(problems[0].path, msg)


def write_report(path: str | os.PathLike, problems: Iterable[Problem], what: str) -> None:
    """Writes ``{"what", "count", "skipped": [{"name", "path", "reason"}...]}`` atomically."""
    problems = list(problems)
    io.write_json_atomic(path, {"what": what, "count": len(problems),
                                "skipped": [dataclasses.asdict(p) for p in problems]})


def check_policy(policy: str) -> str:
    return check_choice("data.on_bad_input", policy, POLICIES)

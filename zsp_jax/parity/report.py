"""The parity report: a console table, ``<out>/parity.json``, ``<out>/parity.md`` and label-map pictures.

Columns: component, run (dtype / matmul precision), worst (the largest relative error, or the
lowest per-image agreement), median, how much was compared, the tolerance and the verdict (judged
rows only: ``pass`` / ``FAIL``; ``EMPTY`` when nothing was compared; ``-`` for the extra runs,
which report figures without a verdict). Failing components are listed after the table, one
``FAIL <component>: <figure> > <bound>`` line each.

Pictures: for the images whose label maps differ in the judged run, ``<out>/label_<n>.png`` shows
ours | reference | disagreement (the image greyed, differing pixels in red), worst first.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsp_jax.parity.tolerances import MAX_REL, TOLERANCES, Row

MAX_PICTURES = 4
HEADER = ("component", "run", "worst", "median", "compared", "tolerance", "verdict")


def _value(row: Row, value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.1e}" if row.tolerance.kind == MAX_REL else f"{value:.2%}"


def _count(row: Row) -> str:
    n = row.figure.count
    text = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)
    return f"{text} {row.tolerance.unit}"


def cells(row: Row) -> tuple[str, ...]:
    """One row's cells, in ``HEADER`` order."""
    tolerance = row.tolerance.describe() if row.judged else "(figures only)"
    return (row.component, row.run, _value(row, row.figure.worst), _value(row, row.figure.median), _count(row),
            tolerance, row.verdict)


def console_table(rows: Sequence[Row]) -> str:
    """The table as aligned text."""
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failures(rows: Sequence[Row]) -> list[str]:
    """One ``FAIL ...`` line per failing judged row."""
    return [r.failure_line() for r in rows if r.failed]


def summary(rows: Sequence[Row]) -> str:
    """The closing line(s): the failures, or that every float32 comparison passed."""
    failed = failures(rows)
    if failed:
        return "\n".join(failed)
    judged = sum(r.judged for r in rows)
    return f"PASS: all {judged} float32 comparisons are within tolerance"


def to_json(rows: Sequence[Row], header: dict[str, Any]) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    def number(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {**header,
            "passed": not failures(rows),
            "failures": failures(rows),
            "tolerances": {k: {"kind": t.kind, "bound": t.bound, "what": t.what} for k, t in TOLERANCES.items()},
            "rows": [{"component": r.component, "run": r.run, "judged": r.judged, "worst": number(r.figure.worst),
                      "median": number(r.figure.median), "count": r.figure.count, "unit": r.tolerance.unit,
                      "note": r.figure.note, "tolerance": r.tolerance.describe() if r.judged else None,
                      "verdict": r.verdict} for r in rows]}


def _markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " | note |", "|" + "---|" * (len(HEADER) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(cells(r)) + f" | {r.figure.note.replace('|', '/')} |")
    return "\n".join(lines)


def _colour(label: np.ndarray) -> np.ndarray:
    from zsp_jax.data.synthetic import voc_palette

    return voc_palette()[label]


def picture(image: np.ndarray, ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(H, 3W + 8, 3) uint8: ours | reference | disagreement (the image greyed, differing pixels red)."""
    grey = (0.3 * image.mean(axis=-1, keepdims=True) + 90).astype(np.uint8).repeat(3, axis=-1)
    grey[ours != reference] = (255, 0, 0)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([_colour(ours), gap, _colour(reference), gap, grey], axis=1)


def write_pictures(out_dir: str, pictures: Sequence[Any]) -> list[tuple[str, Any]]:
    """Writes up to ``MAX_PICTURES`` pictures (worst agreement first); returns (file name, picture) pairs."""
    from zsp_jax.data.decode import encode_png
    from zsp_jax.utils import io

    written = []
    for n, pic in enumerate(sorted(pictures, key=lambda p: p.agreement)[:MAX_PICTURES]):
        name = f"label_{n}.png"
        io.write_bytes_atomic(os.path.join(out_dir, name), encode_png(picture(pic.image, pic.ours, pic.reference)))
        written.append((name, pic))
    return written


def markdown(rows: Sequence[Row], header: dict[str, Any], pictures: Sequence[tuple[str, Any]]) -> str:
    """``parity.md``."""
    judged = [r for r in rows if r.judged]
    extra = [r for r in rows if not r.judged]
    parts = ["# zsp_jax parity on your files", "",
             f"Machine: {header['machine']}. Command: `{header['command']}`", "",
             "Inputs: " + "; ".join(header["inputs"]), ""]
    if header.get("notes"):
        parts += ["Notes:", ""] + [f"- **{k}**: {v}" for k, v in header["notes"].items()] + [""]
    parts += ["## float32 against the PyTorch originals (judged)", "", _markdown_table(judged), "",
              "**" + summary(rows).replace("\n", "; ") + "**", ""]
    if extra:
        parts += ["## Other dtypes / matmul precisions (ours against the float32 originals; figures only)", "",
                  _markdown_table(extra), ""]
    if pictures:
        parts += ["## Label maps that differ (float32)", "",
                  "Each picture: ours | reference | disagreement (differing pixels in red).", ""]
        for name, pic in pictures:
            parts += [f"**{pic.name}**: {pic.agreement:.3%} of pixels agree", "", f"![{pic.name}]({name})", ""]
    parts += ["Tolerances: " + "; ".join(f"{k} {t.describe()}" for k, t in TOLERANCES.items()), ""]
    return "\n".join(parts)


def write(out_dir: str, rows: Sequence[Row], header: dict[str, Any], pictures: Sequence[Any]) -> tuple[str, str]:
    """Writes ``parity.json``, ``parity.md`` and the pictures; returns the two report paths."""
    from zsp_jax.utils import io

    written = write_pictures(out_dir, pictures)
    json_path = os.path.join(out_dir, "parity.json")
    md_path = os.path.join(out_dir, "parity.md")
    data = to_json(rows, header)
    data["pictures"] = [name for name, _ in written]
    io.write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")
    io.write_text_atomic(md_path, markdown(rows, header, written))
    return json_path, md_path

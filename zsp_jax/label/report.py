"""``<out>/report.html``: what a labelling run produced, to look at before reading numbers.

A grid of images (image | pseudo label | ground truth when there is one) as PNG thumbnails in
``<out>/report/``, the colour legend of the classes, a bar chart of pixels per class over the
whole run, the quality table when ground truth was evaluated, the slowest images and every
image that could not be labelled. Self-contained apart from the thumbnails (relative links),
written atomically.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from zsp_jax.label import outputs
from zsp_jax.utils import io

THUMB = 240  # longer side of a thumbnail, pixels


def _thumb(array: np.ndarray, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    s = THUMB / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def _save_png(path: str, array: np.ndarray) -> None:
    from zsp_jax.data.decode import encode_png

    io.write_bytes_atomic(path, encode_png(array))


def _class_pixels_chart(path: str, names: Sequence[str], pixels: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = outputs.PALETTE[: len(names)] / 255.0
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.2), dpi=100)
    ax.bar(range(len(names)), pixels / max(pixels.sum(), 1) * 100, color=colours, edgecolor="k", linewidth=0.3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("% of labelled pixels")
    ax.set_title("pixels per class (all images)")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(out_dir: str, classes: Any, entries: dict[str, dict[str, Any]], gt_of: dict[str, str], *,
                 n_images: int, quality: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    """Writes ``<out>/report.html`` and its thumbnails; returns the path."""
    from zsp_jax.data.decode import decode_image, decode_mask

    rep = os.path.join(out_dir, "report")
    os.makedirs(rep, exist_ok=True)
    ok = sorted((n for n, e in entries.items() if e.get("status") == "ok"))
    failed = sorted((n for n, e in entries.items() if e.get("status") == "failed"))
    names = list(classes.names)
    pixels = np.zeros(len(names) + 1, np.int64)  # + uncovered
    for n in ok:
        for v, c in entries[n].get("pixels", {}).items():
            v = int(v)
            pixels[len(names) if v == 255 else min(v, len(names) - 1)] += c
    _class_pixels_chart(os.path.join(rep, "class_pixels.png"), names, pixels[: len(names)])

    step = max(1, len(ok) // max(n_images, 1))
    rows = []
    for k, n in enumerate(ok[::step][:n_images]):
        e = entries[n]
        try:
            with open(e["path"], "rb") as f:
                image = decode_image(f.read(), e["path"], exif=bool(e.get("exif", False)))
            with open(os.path.join(out_dir, e["label"]), "rb") as f:
                label = decode_mask(f.read())
        except Exception:  # noqa: BLE001 - a file removed since: leave it out of the report
            continue
        cells = [("image", _thumb(image, False)), ("pseudo label", _thumb(outputs.colourize(label), True))]
        if n in gt_of and gt_of[n] and os.path.isfile(gt_of[n]):
            with open(gt_of[n], "rb") as f:
                cells.append(("ground truth", _thumb(outputs.colourize(decode_mask(f.read())), True)))
        tds = []
        for j, (what, arr) in enumerate(cells):
            fname = f"{k:04d}_{j}.png"
            _save_png(os.path.join(rep, fname), arr)
            tds.append(f'<td><img src="report/{fname}" title="{html.escape(what)}"></td>')
        present = ", ".join(html.escape(names[int(v)]) for v in e.get("pixels", {}) if int(v) < len(names))
        rows.append(f"<tr><td class=name>{html.escape(n)}<br><small>{e['segments']} segments, "
                    f"covered {100 * e['covered']:.0f} %<br>{present}</small></td>{''.join(tds)}</tr>")

    legend = "".join(f'<span class=sw style="background:rgb{tuple(outputs.PALETTE[i].tolist())}"></span>'
                     f"{i} {html.escape(nm)} &nbsp; " for i, nm in enumerate(names))
    legend += f'<span class=sw style="background:rgb{tuple(outputs.PALETTE[255].tolist())}"></span>255 ignore'
    slow = sorted(ok, key=lambda n: -sum(entries[n].get("seconds", {}).values()))[:10]
    slow_rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{entries[n]['height']}x{entries[n]['width']}</td>"
                        f"<td>{entries[n]['segments']}</td><td>{sum(entries[n]['seconds'].values()):.2f}</td></tr>"
                        for n in slow)
    fail_rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(entries[n].get('error', ''))}</td></tr>"
                        for n in failed[:200])
    qual = ""
    if quality and quality.get("images"):
        a, b = quality["as_labelled"], quality["uncovered_as_background"]
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        cls_rows = "".join(f"<tr><td>{html.escape(nm)}</td><td>{pct(v)}</td><td>{pct(b['per_class'][nm])}</td></tr>"
                           for nm, v in a["per_class"].items())
        qual = (f"<h2>Quality against ground truth ({quality['images']} images)</h2>"
                f"<p>as labelled: mIoU <b>{a['miou']:.2f}</b> (classes present {a['miou_present']:.2f}), pixel "
                f"accuracy {a['pixel_accuracy']:.2f} %, coverage {a['coverage']:.2f} %; uncovered as background: "
                f"mIoU <b>{b['miou']:.2f}</b></p><table><tr><th>class</th><th>IoU %</th>"
                f"<th>IoU %, uncovered = background</th></tr>{cls_rows}</table>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>zsp_jax pseudo labels</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td{{vertical-align:top;padding:3px}}
.sw{{display:inline-block;width:12px;height:12px;border:1px solid #444;margin-right:3px}}
table{{border-collapse:collapse}} th,td{{border-bottom:1px solid #ddd;text-align:left}} .name{{max-width:16em}}</style>
</head><body><h1>Pseudo labels: {html.escape(out_dir)}</h1>
<p>{summary.get('labelled_total', len(ok))} images labelled, {len(failed)} could not be labelled;
classes from {html.escape(str(classes.source))}.</p>
<p>{legend}</p><img src="report/class_pixels.png">
{qual}
<h2>Images</h2><table>{''.join(rows)}</table>
<h2>Slowest images</h2><table><tr><th>image</th><th>size</th><th>segments</th><th>seconds</th></tr>{slow_rows}</table>
<h2>Not labelled ({len(failed)})</h2><table>{fail_rows}</table>
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    io.write_text_atomic(path, page)
    return path

"""One parity run: the estimate, every run of ours against the originals, the report, the exit code.

``run(setup)`` prints what is compared and the time estimate, then for each run (float32 at highest
precision first, then each other dtype / matmul precision asked for) sets
``jax_default_matmul_precision``, loads our models in that dtype and compares each component group
(``zsp_jax.parity.comparisons``) under a progress bar; it prints the table and the summary, writes
the report files and returns the rows and the exit code (0: every float32 comparison within
tolerance; 1: not).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from zsp_jax.parity import ours, report
from zsp_jax.parity.comparisons import Comparer
from zsp_jax.parity.estimate import describe_models, estimate
from zsp_jax.parity.inputs import RunSpec, Setup
from zsp_jax.parity.tolerances import Row

EXIT_PASS, EXIT_FAIL = 0, 1


def compare_run(comparer: Comparer, run: RunSpec) -> list[Row]:
    """Every component group of ``comparer.setup`` for one run of ours (models loaded in its dtype)."""
    s = comparer.setup
    groups = set(s.components)
    sam = clip = tokenizer = deeplab = None
    if s.sam is not None and groups & {"sam", "amg", "label"}:
        sam = ours.load_sam(s.sam[0], s.cache_dir, dtype=run.dtype, allow_custom=s.sam_allow_custom,
                            attention=s.attention)
    if s.clip is not None and groups & {"clip", "label"}:
        clip, tokenizer = ours.load_clip(s.clip[0], s.cache_dir, model_name=s.clip_model_name, dtype=run.dtype,
                                         attention=s.attention)
    if s.deeplab is not None and "deeplab" in groups:
        deeplab = ours.load_deeplab(s.deeplab[0], dtype=run.dtype, geometry=s.deeplab_geometry)
    rows: list[Row] = []
    for group in s.components:
        if group == "sam":
            rows += comparer.sam_rows(run, sam)
        elif group == "amg":
            rows += comparer.amg_rows(run, sam)
        elif group == "clip":
            rows += comparer.clip_rows(run, clip, tokenizer)
        elif group == "label":
            rows += comparer.label_rows(run, sam, clip, tokenizer)
        elif group == "deeplab" and deeplab is not None:
            rows += comparer.deeplab_rows(run, deeplab)
    return rows


def run(setup: Setup, *, command: Sequence[str] = (), progress: bool = True,
        log: Callable[[str], None] = print) -> tuple[list[Row], int]:
    """The whole parity check of ``setup``; returns (rows, exit code)."""
    import jax
    import tqdm

    from zsp_jax.utils import bench

    for line in describe_models(setup):
        log(line)
    est = estimate(setup)
    log(est.line())
    n = len(setup.images)
    reference_steps = n * len(set(setup.components) & {"sam", "amg", "clip", "label", "deeplab"})
    bar = tqdm.tqdm(total=reference_steps + len(setup.runs) * n * len(setup.components), desc="parity",
                    unit="step", file=sys.stderr, disable=not progress)
    def more_steps(n: int) -> None:
        bar.total += n
        bar.refresh()

    comparer = Comparer(setup, tick=bar.update, log=lambda line: bar.write(line, file=sys.stdout),
                        more_steps=more_steps)
    previous = jax.config.jax_default_matmul_precision
    rows: list[Row] = []
    start = time.perf_counter()
    try:
        for spec in setup.runs:
            bar.set_postfix_str(spec.name)
            jax.config.update("jax_default_matmul_precision", spec.precision)
            rows += compare_run(comparer, spec)
            gc.collect()  # drop this run's models before the next run loads its own
    finally:
        jax.config.update("jax_default_matmul_precision", previous)
        bar.close()
    elapsed = time.perf_counter() - start
    log("")
    log(report.console_table(rows))
    for key, note in comparer.notes.items():
        log(f"note ({key}): {note}")
    header: dict[str, Any] = {
        "command": " ".join(command) or "python -m zsp_jax.parity", "machine": bench.machine_description(),
        "device": str(jax.devices()[0]), "inputs": describe_models(setup), "notes": dict(comparer.notes),
        "images": [{"name": name, "height": int(im.shape[0]), "width": int(im.shape[1])} for name, im in setup.images],
        "runs": [spec.name for spec in setup.runs], "estimate_s": round(est.seconds, 1), "elapsed_s": round(elapsed, 1),
        "label_settings": setup.options.fingerprint()}
    json_path, md_path = report.write(setup.out_dir, rows, header, comparer.pictures)
    log(report.summary(rows))
    log(f"report: {md_path} and {json_path} ({elapsed / 60:.1f} min; estimated {est.seconds / 60:.1f})")
    return rows, EXIT_FAIL if report.failures(rows) else EXIT_PASS

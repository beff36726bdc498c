"""One-command check of a device: what JAX finds, how fast it multiplies, labels and trains, how bf16 agrees
with fp32, and how much memory the programs take against XLA's estimates.

Sections (each row is measured on its own: a failure, e.g. out of memory on vit_h, is recorded in the tables
as ``failed: <one line>`` and the rest goes on):

* devices: platform, device kind, count, ``memory_stats()["bytes_limit"]`` where the backend reports it, and
  the "auto" defaults this platform gets (label size limits, attention implementation).
* matmul: the dense matmul rate (``zsp_jax.utils.bench.matmul_rate``) in fp32 under
  ``jax.default_matmul_precision("highest")``, in fp32 under ``"default"`` (TF32 on NVIDIA GPUs, bf16 passes
  on TPUs) and in bf16.
* label: the zero-shot labeller (``zsp_jax.label.labeller.Labeller``) with SAM vit_b and vit_h and CLIP
  ViT-B/16 GEM at 448 (``--tiny``: the smoke run's tiny SAM and CLIP), 32x32 points (``--tiny``: 8x8), in fp32
  and bf16 (``label.dtype``), the throughput sizes left at "auto": the sizes the labeller chose, its memory
  estimate, compile time, images/s of the device program and the masks kept. The weights are random
  (``zsp_jax.utils.weights.build_with_random_weights``); the labels use ``random_weight_label_config()``'s
  filters (no IoU / stability filter, no NMS), under which random weights keep up to ``max_masks`` segments:
  the time is that of a real-size workload, the labels mean nothing. Two distinct photos (480x640) are
  labelled, cycled to fill every call of the chosen batch size (a call of 8 images with 2 real ones would time
  8 images' work).
* train: the trainer's UniMatch (V1) step (``zsp_jax.train.step.make_train_step``: on-device strong views
  and CutMix, the step, SGD) for DeepLabV3+ R101 at crops 321 and 513 (``--tiny``: the tiny ResNet at 65),
  2 labelled + 2 unlabelled images (UniMatch's per GPU), in fp32 and bf16 compute (``model.dtype``; parameters
  fp32), random initial weights, the matmul precision of ``train.matmul_precision``: steps/s, compile time,
  XLA's memory estimate, the first step's loss.
* agreement: bf16 against fp32 on the same inputs and weights: the label maps' pixel agreement and the
  first train step's loss relative deviation. With random weights most segments' classes are near ties, so
  the label agreement is likely pessimistic for trained weights (``python -m zsp_jax.parity`` measures those).
* memory: per program, XLA's estimate (``compiled.memory_analysis()``) against the device's
  ``peak_bytes_in_use`` after it ran (the peak since the process started: JAX cannot reset it, so the train
  steps run before the labeller's larger programs) and ``bytes_limit``.

Everything runs on one device (the first): the figures are per chip. ``--tiny`` (the default on a CPU, unless
``--full``) uses the tiny models and one timed call each, so that the whole check takes a couple of minutes
on a 2-core CPU; its figures test the tool, not the machine.

Writes ``device_check.md`` (a table per section, with the device, date and jax version) and
``device_check.json`` to ``--out`` (default: the current folder), each atomically.

  python tools/device_check.py                        # --tiny on a CPU, the full check on a GPU / TPU
  python tools/device_check.py --out results/h100     # where the two files go
  python tools/device_check.py --sections matmul,label --sam vit_b   # a shorter check
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from zsp_jax import cli

SECTIONS = ("devices", "matmul", "label", "train", "agreement", "memory")
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")
DTYPES = ("float32", "bfloat16")
GIB = 2**30

# Column headers of the markdown tables, per JSON key (keys not listed are shown as they are).
HEADERS = {
    "name": "", "platform": "platform", "device_kind": "device kind", "memory_gib": "bytes_limit (GiB)",
    "dtype": "dtype", "precision": "matmul precision", "n": "matrix side", "tflops": "TFLOP/s",
    "seconds": "seconds", "sizes": "auto sizes chosen", "batch": "images per call",
    "xla_estimate_gib": "XLA estimate (GiB)", "budget_gib": "budget (GiB)", "compile_s": "compile (s)",
    "images_per_s": "images/s", "masks_kept": "masks kept per image", "crop": "crop",
    "steps_per_s": "steps/s", "first_loss": "first-step loss", "measure": "measure", "value": "value",
    "peak_gib": "peak_bytes_in_use after it (GiB)", "limit_gib": "bytes_limit (GiB)",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The workloads of one check: the full one, or the tiny one that tests the tool on a CPU."""

    tiny: bool
    matmul_n: int  # side of the square matrices
    sam_variants: tuple[str, ...]  # "tiny": SamConfig.tiny(256) with ClipConfig.tiny(); else with CLIP ViT-B/16
    points_per_side: int
    image_hw: tuple[int, int]  # (H, W) of the photos labelled
    backbone: str  # model.backbone of the trainer
    crops: tuple[int, ...]
    batch: int  # labelled (= unlabelled) images per train step
    train_steps: int  # steps per timed call
    repeats: int  # timed calls (the fastest counts)

    @classmethod
    def of(cls, tiny: bool, sam: tuple[str, ...] | None) -> Plan:
        if tiny:
            return cls(True, 256, ("tiny",), 8, (192, 256), "tiny_resnet", (65,), 2, 1, 1)
        return cls(False, 8192, sam or ("vit_b", "vit_h"), 32, (480, 640), "r101", (321, 513), 2, 5, 2)


# ----------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> Any:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="folder for device_check.md and device_check.json (created)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny models, one call each (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the real-size check, also on a CPU (slow there)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    p.add_argument("--sam", default="", help="SAM variants of the label section, comma-separated (default "
                                             "vit_b,vit_h; --tiny: the tiny SAM)")
    args = p.parse_args(argv)
    args.sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections={','.join(args.sections)}: expected some of {','.join(SECTIONS)}")
    args.sam = tuple(s.strip() for s in args.sam.split(",") if s.strip()) or None
    if args.sam and any(s not in SAM_VARIANTS for s in args.sam):
        p.error(f"--sam={','.join(args.sam)}: expected some of {','.join(SAM_VARIANTS)}")
    if args.sam and args.tiny:
        p.error("--sam: the tiny check uses the tiny SAM; leave --sam out or add --full")
    return args


# ----------------------------------------------------------------------------------------- recording


def one_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message (XLA's out-of-memory errors
    say RESOURCE_EXHAUSTED there)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Report:
    """The rows of every section, written as markdown and JSON."""

    def __init__(self, sections: tuple[str, ...]):
        self.sections: dict[str, list[dict[str, Any]]] = {name: [] for name in sections}
        self.header: dict[str, Any] = {}
        self.memory: list[dict[str, Any]] = []  # (program, estimate, peak after) for the memory section

    def attempt(self, section: str, name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Runs ``measure`` (-> the row's values), records the row or ``failed: <one line>``, prints progress."""
        t0 = time.perf_counter()
        try:
            values = measure()
        except Exception as e:  # noqa: BLE001 - a failing row is a result; the other rows go on
            row = {"name": name, "failed": one_line(e)}
        else:
            row = {"name": name, **values}
        if section in self.sections:
            self.sections[section].append(row)
        shown = (f"failed: {row['failed']}" if "failed" in row else
                 "; ".join(f"{HEADERS.get(k, k) or k} {format_value(v)}" for k, v in row.items() if k != "name"))
        print(f"   {name}: {shown} [{time.perf_counter() - t0:.1f} s]", flush=True)
        return None if "failed" in row else row

    def fail_all(self, section: str, names: list[str], error: BaseException) -> None:
        for name in names:
            self.sections[section].append({"name": name, "failed": one_line(error)})
        print(f"   {', '.join(names)}: failed: {one_line(error)}", flush=True)

    def to_json(self) -> dict[str, Any]:
        """Header and sections; a non-finite number (a diverged loss) as its string: JSON has no NaN."""

        def plain(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return plain({**self.header, "sections": self.sections})

    def to_markdown(self) -> str:
        h = self.header
        lines = [f"# Device check: {h['device']}", "",
                 f"- date: {h['date']}", f"- jax {h['jax']}, jaxlib {h['jaxlib']}, backend {h['backend']}",
                 f"- machine: {h['machine']}", f"- mode: {h['mode']}"]
        if "seconds" in h:
            lines.append(f"- run time: {h['seconds']:.0f} s")
        lines += [f"- {k}: {v}" for k, v in h.get("defaults", {}).items()]
        for section, rows in self.sections.items():
            lines += ["", f"## {section}", ""]
            if not rows:
                lines.append("(nothing measured)")
                continue
            keys = list(dict.fromkeys(k for row in rows for k in row if k != "failed"))
            keys += ["result"] * (len(keys) < 2)  # every row failed: a column for the reason
            lines.append("| " + " | ".join(HEADERS.get(k, k) for k in keys) + " |")
            lines.append("|" + " --- |" * len(keys))
            for row in rows:
                if "failed" in row:
                    cells = [row["name"], f"failed: {row['failed']}"] + [""] * (len(keys) - 2)
                else:
                    cells = [format_value(row.get(k)) for k in keys]
                lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    if value is None:
        return "not reported"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        return (f"{value:.0f}" if magnitude >= 1000 else f"{value:.1f}" if magnitude >= 100 else
                f"{value:.2f}" if magnitude >= 1 else f"{value:.3g}")
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / GIB


def memory_stats(device: Any) -> dict[str, Any]:
    """The device's ``memory_stats()`` ({} where the backend reports none, e.g. the CPU)."""
    try:
        return dict(device.memory_stats() or {})
    except Exception:  # noqa: BLE001 - backends without memory statistics raise
        return {}


def peak_gib(device: Any) -> float | None:
    return gib(memory_stats(device).get("peak_bytes_in_use"))


def free_memory() -> None:
    """Drops the previous row's arrays (a labeller's weights are held in cycles) before the next row."""
    gc.collect()


# ----------------------------------------------------------------------------------------- sections


def devices_section(report: Report) -> None:
    import jax

    for index, device in enumerate(jax.devices()):
        report.attempt("devices", f"device {index}", lambda d=device: {
            "platform": d.platform, "device_kind": d.device_kind,
            "memory_gib": gib(memory_stats(d).get("bytes_limit"))})


def matmul_section(report: Report, plan: Plan, device: Any) -> None:
    import jax
    import jax.numpy as jnp

    from zsp_jax.utils import bench

    for dtype, precision in (("float32", "highest"), ("float32", "default"), ("bfloat16", "default")):
        def measure(dtype: str = dtype, precision: str = precision) -> dict[str, Any]:
            with jax.default_matmul_precision(precision):  # read when matmul_rate traces its product
                rate = bench.matmul_rate(jnp.dtype(dtype), n=plan.matmul_n, device=device)
            return {"dtype": dtype, "precision": precision, "n": plan.matmul_n, "tflops": rate / 1e12}

        report.attempt("matmul", f"{dtype}, precision {precision}", measure)


def label_models(variant: str, clip_config: Any, fp32: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """(SAM, CLIP) of ``variant``: float32 with random weights, or with ``fp32`` given, bfloat16 copies of its
    models as the label stage builds them for ``label.dtype=bfloat16`` (compute and weights in bfloat16)."""
    import jax.numpy as jnp
    from flax import nnx

    from zsp_jax.models.clip import ClipModel
    from zsp_jax.models.clip.convert import build_clip
    from zsp_jax.models.sam import Sam, SamConfig
    from zsp_jax.utils import weights

    sam_config = SamConfig.tiny(image_size=256) if variant == "tiny" else SamConfig.from_name(variant)
    if fp32 is None:
        return (weights.build_with_random_weights(lambda: Sam(sam_config, rngs=nnx.Rngs(0))),
                weights.build_with_random_weights(lambda: ClipModel(clip_config, seed=0), seed=1))
    sam32, clip32 = fp32
    sam = weights.build_with_weights(
        lambda: Sam(sam_config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        weights.flat_weights(sam32), source_name="random fp32 SAM", dtype=jnp.bfloat16)
    clip = build_clip(clip_config, weights.flat_weights(clip32), source_name="random fp32 CLIP", dtype=jnp.bfloat16)
    return sam, clip


def label_options(plan: Plan) -> Any:
    """``LabelOptions``: the random-weight filters, the plan's points and (full) GEM's defaults on ViT-B/16."""
    from zsp_jax.label.classes import load_classes
    from zsp_jax.label.options import LabelOptions, default_label_config
    from zsp_jax.models.random_checkpoints import random_weight_label_config

    c = random_weight_label_config()
    c.amg.points_per_side = plan.points_per_side
    if not plan.tiny:
        defaults = default_label_config()
        c.clip_size, c.gem_depth, c.amg.max_masks = defaults.clip_size, defaults.gem_depth, defaults.amg.max_masks
    return LabelOptions.from_config(c, load_classes("voc"))


def measure_labeller(sam: Any, clip: Any, tokenizer: Any, options: Any, images: list[Any], device: Any,
                     plan: Plan, name: str, report: Report) -> tuple[dict[str, Any], list[Any]]:
    """One labeller row (sizes, estimate, compile seconds, images/s, masks kept) and the label maps of
    ``images``."""
    from zsp_jax.label.labeller import Labeller
    from zsp_jax.utils import bench
    from zsp_jax.utils.sharding import data_mesh

    labeller = Labeller(sam, clip, tokenizer, options, mesh=data_mesh([device]))
    bucket = labeller.bucket_for(images[0].shape[:2])
    program = labeller.program(bucket)  # chooses the "auto" sizes and compiles
    per_call = program.batch_size
    count = per_call * math.ceil(len(images) / per_call)  # whole calls, the distinct images cycled
    prepared = [labeller.prepare(images[i % len(images)], bucket) for i in range(count)]
    calls = [prepared[i:i + per_call] for i in range(0, count, per_call)]

    def run() -> list[Any]:
        return [labeller.dispatch(call) for call in calls]

    results = [r for call, out in zip(calls, run()) for r in labeller.results(out, call)]  # also the warm-up
    seconds = bench.time_fn(run, warmup=0, repeats=plan.repeats)
    peak = peak_gib(device)
    estimate = gib(program.memory_bytes)
    report.memory.append({"name": f"labeller {name}", "xla_estimate_gib": estimate, "peak_gib": peak})
    row = {"sizes": program.sizes.describe(), "batch": per_call, "xla_estimate_gib": estimate,
           "budget_gib": gib(program.budget.limit) if program.budget else None,
           "compile_s": program.compile_seconds, "images_per_s": count / seconds,
           "masks_kept": [r.num_segments for r in results[:len(images)]]}
    return row, [r.label for r in results[:len(images)]]


def label_section(report: Report, plan: Plan, device: Any) -> None:
    import numpy as np

    from zsp_jax.models.clip import ClipConfig, ClipTokenizer
    from zsp_jax.references.amg import sample_images

    names = [f"{v} {d}" for v in plan.sam_variants for d in DTYPES]
    try:
        tokenizer = ClipTokenizer.load()
        options = label_options(plan)
        images = sample_images([plan.image_hw] * 2)
    except Exception as e:  # noqa: BLE001 - nothing of this section can run
        report.fail_all("label", names, e)
        return
    clip_config = ClipConfig.tiny() if plan.tiny else ClipConfig.vit_b16()
    for variant in plan.sam_variants:
        fp32_models: tuple[Any, Any] | None = None
        maps: dict[str, list[Any]] = {}
        for dtype in DTYPES:
            def measure(dtype: str = dtype, variant: str = variant, maps: dict = maps) -> dict[str, Any]:
                nonlocal fp32_models
                if dtype == "float32":
                    fp32_models = label_models(variant, clip_config)
                    sam, clip = fp32_models
                elif fp32_models is None:
                    raise RuntimeError("the float32 models could not be built")
                else:
                    sam, clip = label_models(variant, clip_config, fp32_models)
                row, maps[dtype] = measure_labeller(sam, clip, tokenizer, options, images, device, plan,
                                                    f"{variant} {dtype}", report)
                return {"dtype": dtype, **row}

            report.attempt("label", f"{variant} {dtype}", measure)
            free_memory()

        def agreement(maps: dict = maps) -> dict[str, Any]:
            if len(maps) < 2:
                raise RuntimeError("a labeller row failed")
            value = float(np.mean([np.mean(a == b) for a, b in zip(maps["float32"], maps["bfloat16"])]))
            return {"measure": "label pixels equal, bf16 vs fp32", "value": value}

        report.attempt("agreement", f"labeller {variant}", agreement)
        del fp32_models, maps
        free_memory()


def train_config(plan: Plan, crop: int, dtype: str) -> Any:
    """The trainer's config sections for one row: UniMatch V1 on 21 classes, random initial weights."""
    import ml_collections

    from zsp_jax.config_utils import section
    from zsp_jax.train.config import MODEL, TRAIN

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""
    c.data = ml_collections.ConfigDict({"num_classes": 21})
    c.train = section(TRAIN, mode="unimatch", crop_size=crop, batch_size=plan.batch, loss_groups=1)
    c.model = section(MODEL, backbone=plan.backbone, dtype=dtype, pretrained="")
    return c


def host_batch(batch: int, crop: int, num_classes: int, seed: int = 0) -> dict[str, Any]:
    """A uint8 batch as ``zsp_jax.data.pipeline.TrainPipeline`` gives it to the step (UniMatch mode: strong
    views and CutMix boxes made on the device from the ``seed`` of each unlabelled view)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def images() -> np.ndarray:
        return rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)

    mask = rng.integers(0, num_classes, (batch, crop, crop)).astype(np.uint8)
    mask[:, : crop // 12] = 255
    out: dict[str, Any] = {"labeled": {"image": images(), "mask": mask}}
    for stream in ("unlabeled", "unlabeled_mix"):
        ignore = np.zeros((batch, crop, crop), np.uint8)
        ignore[: batch // 2, :, crop - crop // 6:] = 255  # right padding in the first half, as a crop of a small image
        out[stream] = {"image": images(), "ignore_mask": ignore,
                       "seed": rng.integers(0, 2**32, batch, dtype=np.uint64).astype(np.uint32)}
    return out


def measure_train_step(plan: Plan, crop: int, dtype: str, initial: tuple[Any, Any], device: Any, name: str,
                       report: Report) -> dict[str, Any]:
    """One train row: the trainer's step for ``crop`` / ``dtype`` from the ``initial`` (params, batch_stats)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zsp_jax.models.deeplab import DeepLabV3Plus
    from zsp_jax.train import config as train_config_lib
    from zsp_jax.train import state as state_lib
    from zsp_jax.train import step as step_lib
    from zsp_jax.utils import bench
    from zsp_jax.utils.memory import estimated_bytes

    config = train_config(plan, crop, dtype)
    # The graph of this dtype (compute dtype is static), the initial weights shared by every row.
    abstract = nnx.eval_shape(lambda: state_lib.strip_rng_streams(DeepLabV3Plus(
        state_lib.model_config(config), dtype=state_lib.compute_dtype(config), rngs=nnx.Rngs(0))))
    graphdef, _, _ = state_lib.split_model(abstract)
    params, stats = jax.tree.map(jnp.copy, initial)  # the step donates its state
    tx, schedule = state_lib.make_optimizer(config, params, 1000)
    state = state_lib.init_state(params, stats, tx)
    options = train_config_lib.step_options(config)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, options, schedule), donate_argnums=(0,))
    batch = jax.device_put(host_batch(plan.batch, crop, config.data.num_classes), device)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    with jax.default_matmul_precision(config.train.matmul_precision):
        compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run() -> Any:
        for _ in range(plan.train_steps):
            holder[0], metrics = compiled(holder[0], batch, rng)
        return holder[0], metrics

    holder[0], metrics = compiled(holder[0], batch, rng)  # the first step, from the initial state: the warm-up
    first = float(metrics["loss"])
    seconds = bench.time_fn(run, warmup=0, repeats=plan.repeats)
    estimate = gib(estimated_bytes(compiled))
    report.memory.append({"name": f"train step {name}", "xla_estimate_gib": estimate, "peak_gib": peak_gib(device)})
    return {"crop": crop, "dtype": dtype, "batch": f"{plan.batch}+{plan.batch}",
            "precision": config.train.matmul_precision, "xla_estimate_gib": estimate, "compile_s": compile_s,
            "steps_per_s": plan.train_steps / seconds, "images_per_s": 2 * plan.batch * plan.train_steps / seconds,
            "first_loss": first}


def train_section(report: Report, plan: Plan, device: Any) -> None:
    import jax

    from zsp_jax.train import state as state_lib

    names = [f"{plan.backbone} crop {crop} {dtype}" for crop in plan.crops for dtype in DTYPES]
    try:
        with jax.default_device(device):
            model, _ = state_lib.build_model(train_config(plan, plan.crops[0], "float32"))
            _, params, stats = state_lib.split_model(model)
        del model
    except Exception as e:  # noqa: BLE001 - no row can run without the initial weights
        report.fail_all("train", names, e)
        return
    for crop in plan.crops:
        losses: dict[str, float] = {}
        for dtype in DTYPES:
            name = f"{plan.backbone} crop {crop} {dtype}"

            def measure(dtype: str = dtype, name: str = name, crop: int = crop, losses: dict = losses
                        ) -> dict[str, Any]:
                row = measure_train_step(plan, crop, dtype, (params, stats), device, name, report)
                losses[dtype] = row["first_loss"]
                return row

            report.attempt("train", name, measure)
            free_memory()

        def deviation(losses: dict = losses) -> dict[str, Any]:
            if len(losses) < 2:
                raise RuntimeError("a train row failed")
            value = abs(losses["bfloat16"] - losses["float32"]) / abs(losses["float32"])
            return {"measure": "first-step loss relative deviation, bf16 vs fp32", "value": value}

        report.attempt("agreement", f"train step {plan.backbone} crop {crop}", deviation)


def memory_section(report: Report, device: Any) -> None:
    limit = gib(memory_stats(device).get("bytes_limit"))
    for entry in report.memory:
        report.sections["memory"].append({**entry, "limit_gib": limit})
    if not report.memory:
        print("   no program ran", flush=True)
    for entry in report.sections["memory"]:
        print(f"   {entry['name']}: XLA estimate {format_value(entry['xla_estimate_gib'])} GiB, peak after it "
              f"{format_value(entry['peak_gib'])} GiB, limit {format_value(limit)} GiB", flush=True)


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from zsp_jax.utils import io

    problem = io.writable_dir_problem(args.out)  # before any work: an hour's figures must have somewhere to go
    if problem:
        raise cli.UsageError(f"--out={args.out}: {problem}")
    from zsp_jax.runtime import set_cpu_xla_flags

    added = set_cpu_xla_flags()  # what the main job runs with (before JAX starts its backends)
    cli.quiet_library_logs()
    import jax
    import jaxlib

    from zsp_jax.amg import tuning
    from zsp_jax.models.attention import resolve_attention
    from zsp_jax.utils import bench

    device = jax.devices()[0]
    platform = tuning.platform_of([device])
    tiny = args.tiny or (platform == "cpu" and not args.full)
    if tiny and args.sam:
        raise cli.UsageError("--sam: the tiny check (the default on a CPU) uses the tiny SAM; add --full")
    plan = Plan.of(tiny, args.sam)
    report = Report(args.sections)
    report.header = {
        "device": f"{device.device_kind} ({device.platform}) x{jax.device_count()}",
        "date": datetime.date.today().isoformat(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(), "machine": bench.machine_description(),
        "mode": ("tiny (tiny models, one timed call each: tests the tool, not a performance figure)" if tiny
                 else "full"),
        "defaults": {
            "label sizes 'auto' up to": tuning.limits_for(platform).describe(),
            "label.bucket_min_images 'auto'": tuning.BUCKET_MIN_IMAGES.get(platform, 64),
            "attention 'auto'": resolve_attention("auto", device.platform),
            "CPU XLA flags added": added or "none",
        },
    }
    print(f"== device check ({'tiny' if tiny else 'full'}): {report.header['machine']}", flush=True)
    t_start = time.perf_counter()
    if "devices" in args.sections:
        print("== devices", flush=True)
        devices_section(report)
    if "matmul" in args.sections:
        print("== matmul", flush=True)
        matmul_section(report, plan, device)
    # Training before labelling: its programs are the smaller, and the peak memory only ever grows.
    if "train" in args.sections or "agreement" in args.sections:
        print("== train", flush=True)
        train_section(report, plan, device)
    if "label" in args.sections or "agreement" in args.sections:
        print("== label", flush=True)
        label_section(report, plan, device)
    if "memory" in args.sections:
        print("== memory", flush=True)
        memory_section(report, device)
    report.header["seconds"] = round(time.perf_counter() - t_start, 1)
    md_path, json_path = os.path.join(args.out, "device_check.md"), os.path.join(args.out, "device_check.json")
    io.write_text_atomic(md_path, report.to_markdown())
    io.write_json_atomic(json_path, report.to_json())
    print(f"== {report.header['seconds']:.0f} s; wrote {md_path} and {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run_tool(main)

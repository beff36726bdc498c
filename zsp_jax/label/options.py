"""The labeller's settings: the ``label.*`` config section and the frozen options built from it.

``LABEL`` (and ``AMG``, its ``label.amg`` sub-section) is the one place the fields, their defaults and
their meaning are written down (``docs/settings.md`` is generated from them); ``configs/*.py`` build their
``label`` section with ``section(LABEL, ...)``, and ``python -m zsp_jax.label`` uses
``default_label_config()`` when no ``--config`` is given. ``LabelOptions.from_config`` checks every field
(errors name the field) and turns the section into hashable options: the part that shapes the compiled
program (``Rules``, ``AmgOptions``, ``GemConfig``, sizes) is a static argument of ``jax.jit``.

Defaults follow the paper where it speaks (SAM automatic masks, GEM-CLIP dense features,
masked-average segment embeddings, best cosine class, a threshold to background) and
``/work/shared/research/method.md`` section 0.2 where it is silent; each such choice is marked
[assumption] below.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from zsp_jax.amg import AmgOptions, tuning
from zsp_jax.config_utils import Setting, check_choice, check_range, section
from zsp_jax.models.attention import ATTENTION_CHOICES
from zsp_jax.models.clip import GemConfig

NO_CLASS_RULES = ("cosine", "softmax", "none")
POOLINGS = ("bilinear", "area")
PAINT_ORDERS = ("area_desc", "area_asc", "iou_asc")
UNCOVERED = ("ignore", "background")
SYNONYMS = ("max", "mean")
DTYPES = ("auto", "float32", "bfloat16")
PRECISIONS = ("auto", "highest", "high", "default")
IGNORE = 255
# Settings that change how fast labels are made and how they are batched, not what they are: not in the fingerprint.
THROUGHPUT_FIELDS = ("device_memory_gb", "memory_fraction", "bucket_min_images")


def _auto_or_int() -> ml_collections.FieldReference:
    """``"auto"`` in a field typed ``object``, so that ``--config.label.<field>=8`` may set an int (a ``str``
    field would refuse it); a new reference per config (a shared one would carry one config's value to all)."""
    return ml_collections.FieldReference("auto", field_type=object)


# SAM's automatic mask generator: segment-anything's names and defaults (tuned there for ViT-H), plus the two
# fields of the static-shape implementation (zsp_jax.amg.AmgOptions).
AMG = (
    Setting("points_per_side", 32, "points along one side of the prompt grid (points_per_side ** 2 prompts)"),
    Setting("points_per_batch", 64, "prompts decoded at once (the results do not depend on it)"),
    Setting("pred_iou_thresh", 0.88, "keep masks whose predicted IoU is > this (no filter when <= 0)"),
    Setting("stability_score_thresh", 0.95, "keep masks whose stability score is >= this (no filter when <= 0)"),
    Setting("stability_score_offset", 1.0, "logit offset of the stability score's two thresholds"),
    Setting("box_nms_thresh", 0.7, "box IoU above which a mask is suppressed, within one crop"),
    Setting("crop_n_layers", 0, "crop layers; layer i has (2 ** i) ** 2 crops"),
    Setting("crop_nms_thresh", 0.7, "box IoU of the NMS across crops (smaller crops win)"),
    Setting("crop_overlap_ratio", 512 / 1500, "overlap of neighbouring crops in layer 1, a fraction of the short side "
                                             "(512 / 1500)"),
    Setting("crop_n_points_downscale_factor", 1, "layer i uses points_per_side / factor ** i points per side"),
    Setting("mode", "exact", "exact (the reference's statistics) | fast (on a strided pixel grid)"),
    Setting("max_masks", 256, "segments kept per image (a warning in the manifest when more survive)"),
)

# The paper's labeller models (SAM ViT-H, OpenAI CLIP ViT-B/16: GEM's default model), as every dataset config sets
# them: the files are the user's to place (README, "Run on PASCAL VOC or COCO"); the variants are checked before a
# run starts, so a file of another size is refused at once ("" would accept any).
PAPER_MODELS = {"sam_checkpoint": "weights/sam_vit_h_4b8939.pth", "sam_variant": "vit_h",
                "clip_checkpoint": "weights/ViT-B-16.pt", "clip_variant": "vit_b16"}

LABEL = (
    # what to label and where the results go
    Setting("images_dir", "", "a folder of images to label (recursive); \"\" = the config's data split"),
    Setting("split", "unlabeled", "without images_dir: label the split's unlabeled | labeled | both images"),
    Setting("gt_dir", "", "with images_dir: ground-truth masks at <gt_dir>/<name>.png, for evaluation"),
    Setting("out_dir", "", "results; \"\" = <workdir>/pseudo_labels"),
    Setting("evaluate", True, "compare with ground truth wherever it exists (eval.json, report)"),
    Setting("sweep_thresholds", "", "e.g. \"0.1:0.4:0.05\": mIoU per cosine threshold (needs write_segments)"),
    Setting("overwrite", False, "relabel everything in out_dir (else finished images are kept)"),
    Setting("retry_failed", False, "try again the images a previous run could not read"),
    Setting("classes", "voc", "voc | coco | \"cat,dog\" | a class file (one per line, 'name: prompt; prompt')"),
    Setting("templates", "single", "single (\"a photo of a {}.\", GEM's) | imagenet80 (CLIP's 80-template "
                                   "ensemble)"),
    Setting("synonyms", "max", "a class with several prompts scores its best prompt (max) or their mean"),
    # checkpoints (.safetensors converted by tools/convert_*.py, or PyTorch files converted on first use)
    Setting("sam_checkpoint", "", "sam_vit_h_4b8939.pth / sam_vit_b_01ec64.pth or a converted .safetensors "
                                  "(PyTorch files are converted on first use)"),
    Setting("sam_allow_custom", False, "convert a .pth that is none of vit_b / vit_l / vit_h (else refused)"),
    Setting("sam_variant", "", "checked before a run starts: vit_b | vit_l | vit_h (\"\" = any)"),
    Setting("clip_checkpoint", "", "OpenAI ViT-B-16.pt, an open_clip file, a transformers dir or a .safetensors"),
    Setting("clip_model_name", "", "open_clip model name when the file needs one (activation, ViT-H head width)"),
    Setting("clip_variant", "", "checked before a run starts: vit_b16 | vit_b32 | vit_l14 | ... (\"\" = any)"),
    # GEM dense features (defaults: gem.create_gem_model)
    Setting("clip_size", 448, "GEM's input: the image resized (bicubic, aspect not kept) to this square"),
    Setting("gem_depth", 7, "GEM on the last depth - 1 vision blocks"),
    Setting("gem_iterations", 1, "self-self attention clustering iterations"),
    Setting("gem_temperature", 0.0, "0 = GEM's adaptive temperature; > 0 = a fixed inverse temperature"),
    # segment -> class
    Setting("pooling", "bilinear", "segment embedding = masked average of the features resized to the image: "
                                   "bilinear (as GEM resizes its maps) | area (each pixel takes its cell's feature)"),
    Setting("normalize_tokens", True, "L2-normalise each patch feature before averaging [assumption]"),
    Setting("no_class", "cosine", "background when the best cosine < threshold (the paper's \"no class exceeds\") | "
                                  "softmax: when max softmax(temperature * cos) < threshold | none"),
    Setting("threshold", 0.2, "the no_class rule's threshold [assumption; tune it on labelled images: "
                              "python -m zsp_jax.label --eval]"),
    Setting("temperature", 100.0, "softmax scale (CLIP's logit scale) for no_class=\"softmax\""),
    Setting("background_prompts", "", "e.g. \"sky; wall; floor\": segments closest to these become background"),
    Setting("paint_order", "area_desc", "overlapping segments: area_desc = larger first, smaller on top "
                                        "[assumption] | area_asc | iou_asc (higher predicted IoU on top)"),
    Setting("uncovered", "ignore", "pixels no segment covers: ignore (255) [assumption] | background (0)"),
    Setting("amg", lambda: section(AMG), "SAM's automatic mask generator (segment-anything's names and defaults, "
                                         "tuned there for ViT-H): the label.amg section"),
    # image sizes and compiled programs
    Setting("bucket", 64, "images are padded to a multiple of this; one compiled program per padded size"),
    Setting("max_side", 1024, "label larger images at this longer side and resize the map (0 = never)"),
    Setting("letterbox", 0, "> 0: resize every image to this longer side: one program for all images"),
    # outputs besides labels/<id>.png
    Setting("write_confidence", False, "confidence/<id>.png: the winning segment's score x 255"),
    Setting("write_segments", False, "segments/<id>.json: COCO-RLE masks with class, similarity, IoU, stability, "
                                     "bbox"),
    Setting("write_overlays", False, "overlays/<id>.jpg: the image with its pseudo label blended in"),
    Setting("report_images", 24, "images in report.html (0 = no report)"),
    # numerics and throughput ("auto" = chosen per device kind and memory, see README)
    Setting("dtype", "auto", "float32 | bfloat16 compute for SAM and CLIP (auto: by device kind)"),
    Setting("matmul_precision", "auto", "highest | high | default (jax_default_matmul_precision while compiling; "
                                        "auto: by device kind)"),
    Setting("attention", "auto", "SAM/CLIP attention: auto (by backend) | xla | cudnn (GPU, bfloat16) | einsum"),
    # Sizes of the compiled programs: an int, or auto = per size bucket, the largest (up to the device kind's
    # limit, zsp_jax/amg/tuning.py) whose XLA memory estimate fits memory_fraction of device_memory_gb.
    Setting("images_per_device", _auto_or_int, "images per device step: an int, or auto (the largest whose XLA "
                                               "memory estimate fits memory_fraction of device_memory_gb)"),
    Setting("decoder_group", _auto_or_int, "prompts per decoder call: an int, or auto (likewise)"),
    Setting("mask_chunk", _auto_or_int, "kept masks upsampled at once: an int, or auto (likewise)"),
    Setting("device_memory_gb", 0.0, "memory per device for auto; 0 = the device's own limit (CPU: RAM / devices)"),
    Setting("memory_fraction", 0.8, "share of device_memory_gb a program's XLA estimate may take"),
    Setting("bucket_min_images", _auto_or_int, "a folder of mixed sizes: size buckets merge until each compiled "
                                               "program serves at least this many images (auto: 8 on CPU, 64 on "
                                               "accelerators; 1 = one program per padded size); images keep their "
                                               "own size"),
    Setting("decode_threads", 4, "host threads decoding and preparing images ahead of the device"),
    Setting("write_threads", 4, "host threads writing outputs"),
    Setting("prefetch", 2, "batches prepared ahead of the device"),
    Setting("compile_cache", True, "JAX's persistent compilation cache: reruns do not recompile"),
    Setting("compile_cache_dir", "", "where it lives; \"\" = JAX's own (JAX_COMPILATION_CACHE_DIR) if set, else "
                                     "<out>/.jax_cache"),
)


def default_label_config() -> ml_collections.ConfigDict:
    """The ``label`` config section with every field's default (``LABEL``, its ``amg`` sub-section ``AMG``)."""
    return section(LABEL)



@dataclasses.dataclass(frozen=True)
class Rules:
    """How segments become classes and label maps (static: part of the compiled program)."""

    row_labels: tuple[int, ...]  # label value of each prompt row
    num_labels: int  # label values, background included
    no_class: str = "cosine"
    threshold: float = 0.2
    temperature: float = 100.0
    synonyms: str = "max"
    pooling: str = "bilinear"
    normalize_tokens: bool = True
    paint_order: str = "area_desc"
    uncovered: str = "ignore"

    @property
    def uncovered_value(self) -> int:
        return IGNORE if self.uncovered == "ignore" else 0


@dataclasses.dataclass(frozen=True)
class LabelOptions:
    """Everything that decides a pseudo label (``fingerprint``) plus the output and speed settings."""

    classes: Any  # ClassList
    templates: str
    amg: AmgOptions
    gem: GemConfig
    clip_size: int
    no_class: str
    threshold: float
    temperature: float
    synonyms: str
    pooling: str
    normalize_tokens: bool
    paint_order: str
    uncovered: str
    max_side: int
    letterbox: int
    bucket: int
    write_confidence: bool
    write_segments: bool
    write_overlays: bool
    dtype: str
    matmul_precision: str
    device_memory_gb: float = 0.0
    memory_fraction: float = 0.8
    bucket_min_images: int | str = tuning.AUTO

    def rules(self) -> Rules:
        _, row_labels = self.classes.prompt_rows()
        return Rules(tuple(int(v) for v in row_labels), self.classes.num_labels, self.no_class, self.threshold,
                     self.temperature, self.synonyms, self.pooling, self.normalize_tokens, self.paint_order,
                     self.uncovered)

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs' labels comparable (written to ``<out>/label_settings.json``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("classes", "amg", "gem", "write_overlays") + THROUGHPUT_FIELDS}
        out["classes"] = self.classes.to_json()
        out["amg"] = {f.name: getattr(self.amg, f.name) for f in dataclasses.fields(self.amg)
                      if f.name not in ("output_mode", "points_per_batch")}
        out["gem"] = dataclasses.asdict(self.gem)
        return json.loads(json.dumps(out))

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, classes: Any) -> "LabelOptions":
        """Checks the ``label`` section (errors name ``label.<field>``) and builds the options."""
        check_choice("label.no_class", c.no_class, NO_CLASS_RULES)
        check_choice("label.pooling", c.pooling, POOLINGS)
        check_choice("label.paint_order", c.paint_order, PAINT_ORDERS)
        check_choice("label.uncovered", c.uncovered, UNCOVERED)
        check_choice("label.synonyms", c.synonyms, SYNONYMS)
        check_choice("label.dtype", c.dtype, DTYPES)
        check_choice("label.matmul_precision", c.matmul_precision, PRECISIONS)
        check_choice("label.attention", c.attention, ATTENTION_CHOICES)
        check_choice("label.templates", c.templates, ("single", "imagenet80"))
        check_choice("label.split", c.split, ("unlabeled", "labeled", "both"))
        if c.no_class == "softmax":
            check_range("label.threshold", c.threshold, 0.0, 1.0)
        else:
            check_range("label.threshold", c.threshold, -1.0, 1.0)
        check_range("label.temperature", c.temperature, 1e-6, None)
        check_range("label.clip_size", c.clip_size, 16, 4096)
        check_range("label.max_side", c.max_side, 0, 65536)
        check_range("label.letterbox", c.letterbox, 0, 65536)
        check_range("label.bucket", c.bucket, 8, 4096)
        if c.letterbox and c.max_side and c.letterbox > c.max_side:
            raise ValueError(f"config field label.letterbox={c.letterbox}: larger than label.max_side={c.max_side}")
        for name in tuning.FIELDS:
            tuning.parse_size(f"label.{name}", c[name])
        bucket_min_images = tuning.parse_size("label.bucket_min_images", c.get("bucket_min_images", tuning.AUTO))
        check_range("label.device_memory_gb", c.get("device_memory_gb", 0.0), 0.0, None)
        check_range("label.memory_fraction", c.get("memory_fraction", 0.8), 0.01, 1.0)
        for name in ("decode_threads", "write_threads", "prefetch"):
            check_range(f"label.{name}", c[name], 1, 256)
        check_range("label.report_images", c.report_images, 0, 10000)
        a = c.amg
        check_choice("label.amg.mode", a.mode, ("exact", "fast"))
        try:
            amg = AmgOptions(points_per_side=a.points_per_side, points_per_batch=a.points_per_batch,
                             pred_iou_thresh=a.pred_iou_thresh, stability_score_thresh=a.stability_score_thresh,
                             stability_score_offset=a.stability_score_offset, box_nms_thresh=a.box_nms_thresh,
                             crop_n_layers=a.crop_n_layers, crop_nms_thresh=a.crop_nms_thresh,
                             crop_overlap_ratio=a.crop_overlap_ratio,
                             crop_n_points_downscale_factor=a.crop_n_points_downscale_factor, mode=a.mode,
                             max_masks=a.max_masks, bucket=c.bucket)
        except ValueError as e:
            raise ValueError(f"config section label.amg: {e}") from None
        try:
            gem = GemConfig(depth=c.gem_depth, ss_attn_iter=c.gem_iterations,
                            ss_attn_temp=c.gem_temperature if c.gem_temperature > 0 else None)
        except ValueError as e:
            raise ValueError(f"config field label.gem_*: {e}") from None
        if c.background_prompts.strip() and classes.prompts[0]:
            raise ValueError("background prompts are given twice: in label.background_prompts and in the class file")
        if c.background_prompts.strip():
            bg = tuple(p.strip() for p in c.background_prompts.split(";"))
            if any(not p for p in bg):
                raise ValueError(f"config field label.background_prompts={c.background_prompts!r}: an empty prompt "
                                 "(separate prompts with ';')")
            classes = dataclasses.replace(classes, prompts=(bg,) + classes.prompts[1:])
        return cls(classes=classes, templates=c.templates, amg=amg, gem=gem, clip_size=c.clip_size,
                   no_class=c.no_class, threshold=float(c.threshold), temperature=float(c.temperature),
                   synonyms=c.synonyms, pooling=c.pooling, normalize_tokens=bool(c.normalize_tokens),
                   paint_order=c.paint_order, uncovered=c.uncovered, max_side=c.max_side, letterbox=c.letterbox,
                   bucket=c.bucket, write_confidence=bool(c.write_confidence),
                   write_segments=bool(c.write_segments), write_overlays=bool(c.write_overlays), dtype=c.dtype,
                   matmul_precision=c.matmul_precision, device_memory_gb=float(c.get("device_memory_gb", 0.0)),
                   memory_fraction=float(c.get("memory_fraction", 0.8)), bucket_min_images=bucket_min_images)

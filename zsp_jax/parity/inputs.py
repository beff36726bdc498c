"""Everything ``python -m zsp_jax.parity`` is given, checked before any work: ``check(args) -> Setup``.

Each problem is one line naming the flag and what to do; all of them are raised together as one
``cli.UsageError`` (exit code 2, one ``error:`` line each). Checked: the PyTorch packages the
originals need; ``--out`` writable; the dtype / precision / component lists; the label settings
(``--config``, ``--classes``, ``--max_side``); each checkpoint exists and holds the right kind of
model (read from metadata or tensor shapes only), with an original file for the PyTorch side when
ours is a converted ``.safetensors``; every selected image decodes.

Images are labelled at the labeller's work size (``label.max_side`` / ``label.letterbox``, PIL
bilinear, as the labeller resizes), and every comparison sees that same image, so the reference
(which has no such rule) and ours get identical pixels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from zsp_jax import cli
from zsp_jax.parity.tolerances import COMPONENTS

DTYPE_CHOICES = ("float32", "bfloat16")
# What a DeepLab checkpoint's tensors cannot tell (``DeepLabConfig`` fields), by UniMatch's dataset configs.
DEEPLAB_GEOMETRIES = {
    "voc": {"output_stride": 16, "resnet_multi_grid": False, "aspp_rates": (6, 12, 18)},
    "cityscapes": {"output_stride": 8, "resnet_multi_grid": True, "aspp_rates": (12, 24, 36)},
}
PRECISION_CHOICES = ("highest", "high", "default")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of our side: compute dtype and ``jax_default_matmul_precision``."""

    dtype: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.dtype}/{self.precision}"

    @property
    def judged(self) -> bool:
        """float32 at highest precision is the parity run; the others only report figures."""
        return self.dtype == "float32" and self.precision == "highest"


@dataclasses.dataclass
class Setup:
    """The checked inputs of one parity run.

    Attributes:
      images: (name, uint8 (h, w, 3) RGB at the labeller's work size) per image.
      options: the labeller's ``LabelOptions``.
      components: the groups to compare, in ``COMPONENTS`` order.
      runs: our runs; the first is float32/highest (judged).
      sam / clip / deeplab: (our file, the original file for the PyTorch side), or None when not compared.
      clip_model_name / clip_reference_model_name: open_clip model names for our conversion / the original.
      deeplab_size, deeplab_geometry: DeepLab input side (square); ``DEEPLAB_GEOMETRIES`` entry (the
        original's config fields its tensors do not give; ours from a converted file keeps its own).
      sam_allow_custom, attention: as the labeller's ``label.sam_allow_custom`` / ``label.attention``.
      out_dir, cache_dir: results; conversions of original files for our side (``<out>/checkpoints``).
      label_section: the ``label`` config section (for the report).
    """

    images: list[tuple[str, np.ndarray]]
    options: Any
    components: tuple[str, ...]
    runs: list[RunSpec]
    sam: tuple[str, str] | None
    clip: tuple[str, str] | None
    deeplab: tuple[str, str] | None
    clip_model_name: str
    clip_reference_model_name: str
    deeplab_size: int
    deeplab_geometry: dict[str, Any]
    sam_allow_custom: bool
    attention: str
    out_dir: str
    cache_dir: str
    label_section: Any


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def runs_of(dtypes: str, precisions: str, problems: list[str]) -> list[RunSpec]:
    """Every (dtype, precision) pair asked for, float32/highest first (always run: it is the verdict)."""
    dt, pr = _split(dtypes), _split(precisions)
    bad = [d for d in dt if d not in DTYPE_CHOICES]
    if bad or not dt:
        problems.append(f"--dtype={dtypes}: expected a comma-separated list of {', '.join(DTYPE_CHOICES)}")
    bad_p = [p for p in pr if p not in PRECISION_CHOICES]
    if bad_p or not pr:
        problems.append(f"--matmul_precision={precisions}: expected a comma-separated list of "
                        f"{', '.join(PRECISION_CHOICES)}")
    runs = [RunSpec("float32", "highest")]
    for d in dt:
        for p in pr:
            spec = RunSpec(d, p)
            if d in DTYPE_CHOICES and p in PRECISION_CHOICES and spec not in runs:
                runs.append(spec)
    return runs


def image_files(spec: str) -> list[str]:
    """The image files of ``--images``: a folder (recursive, sorted) or one or more comma-separated files."""
    from zsp_jax.data.readers import folder_examples

    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        return [ex.image for ex in folder_examples(spec)]
    return [os.path.expanduser(p) for p in _split(spec)]


def load_images(spec: str, count: int, problems: list[str]) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` images of ``--images`` decoded to uint8 RGB (EXIF orientation applied)."""
    from zsp_jax.data.decode import decode_image

    files = image_files(spec)
    if not files:
        problems.append(f"--images={spec}: no images there (jpg, png, bmp, tif, webp, ...)")
        return []
    out = []
    for path in files[:count]:
        if not os.path.isfile(path):
            problems.append(f"--images: {path}: no such file")
            continue
        try:
            with open(path, "rb") as f:
                out.append((os.path.basename(path), decode_image(f.read(), path, exif=True)))
        except (OSError, ValueError) as e:  # BadInputError is a ValueError
            problems.append(f"--images: {e}")
    return out


def work_image(image: np.ndarray, options: Any) -> np.ndarray:
    """The image at the labeller's work size (``letterbox`` or ``max_side``), PIL bilinear as the labeller."""
    from PIL import Image

    from zsp_jax.models.sam.transforms import resize_longest_side_shape

    h, w = image.shape[:2]
    side = options.letterbox or (options.max_side if options.max_side and max(h, w) > options.max_side else 0)
    if not side:
        return image
    nh, nw = resize_longest_side_shape(h, w, side)
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


def _reference_packages_problem() -> str | None:
    try:
        from zsp_jax.references import torchvision_stub

        torchvision_stub.install()
        import gem  # noqa: F401
        import open_clip  # noqa: F401
        import segment_anything  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return (f"the PyTorch originals need torch, segment-anything, open_clip-torch and gem-torch ({e}); install "
                "them with 'pip install torch==2.13.0 segment-anything open_clip_torch gem_torch'")
    return None


def _label_section(config_spec: str | None, classes: str | None, max_side: int | None,
                   problems: list[str]) -> tuple[Any, Any]:
    """(``label`` section, ``LabelOptions``) of ``--config`` (default: the labeller's defaults) with the flags."""
    import contextlib

    from zsp_jax.parity import ours

    if classes is not None:
        try:
            ours.class_list(classes)
        except (OSError, ValueError) as e:
            problems.append(f"--classes={classes}: {cli.describe(e)}")
            return None, None
    try:
        if config_spec:
            path = config_spec.partition(":")[0]
            if not os.path.isfile(path):
                problems.append(f"--config={config_spec}: no such config file")
                return None, None
            config = cli.load_config_file(config_spec)
            if "label" not in config:
                problems.append(f"--config={config_spec}: the config has no 'label' section")
                return None, None
            section = config.label
        else:
            section = ours.default_label_section()
        with section.unlocked() if getattr(section, "is_locked", False) else contextlib.nullcontext():
            if classes is not None:
                section.classes = classes
            if max_side is not None:
                section.max_side = max_side
        return section, ours.label_options(section, section.classes)
    except Exception as e:  # noqa: BLE001 - the config file or one of its fields is at fault: one line naming it
        problems.append(f"--config={config_spec or '(the labeller defaults)'}: {cli.describe(e)}")
        return None, None


def _sam_files(sam: str | None, reference: str | None, allow_custom: bool | None, problems: list[str]
               ) -> tuple[str, str] | None:
    """(our SAM file, the original .pth for the PyTorch side), or None after adding the problems."""
    from zsp_jax.parity.ours import describe_sam

    if not sam:
        problems.append("--sam: give the SAM checkpoint (sam_vit_h_4b8939.pth, or a converted .safetensors with "
                        "--sam_reference <the original .pth>)")
        return None
    original = reference or sam
    flag = "--sam_reference" if reference else "--sam"
    if original.endswith(".safetensors"):
        problems.append(f"{flag}={original}: the PyTorch side needs the original segment-anything .pth; give the one "
                        f"it was converted from with --sam_reference")
        return None
    try:
        ours_variant = describe_sam(sam)
    except ValueError as e:  # the labeller's CheckpointError
        problems.append(f"--sam: {e}")
        return None
    try:
        ref_variant = describe_sam(original) if original != sam else ours_variant
    except ValueError as e:  # the labeller's CheckpointError
        problems.append(f"--sam_reference: {e}")
        return None
    if ref_variant != ours_variant:
        problems.append(f"--sam={sam} holds SAM {ours_variant}, --sam_reference={reference} holds {ref_variant}")
        return None
    if ours_variant == "custom" and allow_custom is False and not sam.endswith(".safetensors"):
        problems.append(f"--sam={sam} is none of vit_b / vit_l / vit_h (truncated?); set label.sam_allow_custom=True "
                        "in --config if it is a custom SAM")
        return None
    return sam, original


def _clip_files(clip: str | None, reference: str | None, model_name: str, reference_name: str,
                problems: list[str]) -> tuple[str, str] | None:
    """(our CLIP file, the original for the PyTorch side), or None after adding the problems."""
    from zsp_jax.parity import originals
    from zsp_jax.parity.ours import describe_clip

    if not clip:
        problems.append("--clip: give the CLIP checkpoint (OpenAI's ViT-B-16.pt, an open_clip file or a transformers "
                        "directory, or a converted .safetensors with --clip_reference <the original>)")
        return None
    original = reference or clip
    if original.endswith(".safetensors"):
        flag = "--clip_reference" if reference else "--clip"
        problems.append(f"{flag}={original}: the PyTorch side needs the original file (OpenAI .pt, open_clip file or "
                        "transformers directory); give the one it was converted from with --clip_reference")
        return None
    try:
        describe_clip(clip, model_name)
    except ValueError as e:  # the labeller's CheckpointError
        problems.append(f"--clip: {e}")
        return None
    if original != clip or reference_name != model_name:
        try:
            describe_clip(original, reference_name)
        except ValueError as e:  # the labeller's CheckpointError
            problems.append(f"--clip_reference: {e}".replace("--clip_model_name", "--clip_reference_model_name"))
            return None
    if reference_name:
        try:
            originals.open_clip_settings(reference_name)
        except ValueError as e:
            flag = "--clip_reference_model_name" if reference_name != model_name else "--clip_model_name"
            problems.append(f"{flag}={reference_name}: {e}")
            return None
    return clip, original


def _deeplab_files(deeplab: str | None, reference: str | None, geometry: str, problems: list[str]
                   ) -> tuple[str, str] | None:
    if not deeplab:
        return None
    deeplab = os.path.expanduser(deeplab)
    original = deeplab
    if not os.path.isfile(deeplab):
        problems.append(f"--deeplab={deeplab}: no such file (UniMatch's best.pth, or a converted .safetensors)")
        return None
    if deeplab.endswith(".safetensors"):
        if not reference:
            problems.append(f"--deeplab={deeplab} is a converted file: give the UniMatch checkpoint it came from with "
                            "--deeplab_reference, for the PyTorch side")
            return None
        original = os.path.expanduser(reference)
        try:
            from zsp_jax.utils.weights import load_weights

            _, meta = load_weights(deeplab, expect={"zsp_jax.model": "deeplabv3plus"})
            if meta.get("zsp_jax.contents", "full") != "full":
                raise ValueError("it holds a backbone only")
        except Exception as e:  # noqa: BLE001
            problems.append(f"--deeplab={deeplab}: not a converted DeepLabV3+ checkpoint ({cli.describe(e)})")
            return None
    flag = "--deeplab_reference" if original != deeplab else "--deeplab"
    if not os.path.isfile(original):
        problems.append(f"{flag}={original}: no such file")
        return None
    try:
        from zsp_jax.models.deeplab.convert import detect_source, read_torch_checkpoint

        info = detect_source(read_torch_checkpoint(original), source_name=original)
    except Exception as e:  # noqa: BLE001 - unreadable or foreign file
        problems.append(f"{flag}={original}: not a UniMatch DeepLabV3+ checkpoint ({cli.describe(e)})")
        return None
    if info.contents != "full":
        problems.append(f"{flag}={original} is {info.describe()}: give a trained DeepLabV3+ checkpoint (UniMatch's "
                        "best.pth)")
        return None
    if geometry in DEEPLAB_GEOMETRIES:
        from zsp_jax.models.deeplab.convert import config_for

        try:
            config_for(info, **DEEPLAB_GEOMETRIES[geometry])
        except ValueError as e:
            problems.append(f"--deeplab_geometry={geometry}: does not fit {original} ({e})")
            return None
    return deeplab, original


def check(args: Any) -> Setup:
    """The flags of ``python -m zsp_jax.parity`` (an argparse namespace) -> ``Setup``; raises ``cli.UsageError``
    with one line per problem."""
    from zsp_jax.utils import io

    problems: list[str] = []
    packages = _reference_packages_problem()
    if packages:
        raise cli.UsageError(packages)
    if not args.out:
        problems.append("--out: give the output folder (parity.json, parity.md and pictures are written there)")
    elif problem := io.writable_dir_problem(args.out):
        problems.append(f"--out={args.out}: {problem}")
    components = tuple(c for c in COMPONENTS if c in _split(args.components))
    unknown = [c for c in _split(args.components) if c not in COMPONENTS]
    if unknown or not components:
        problems.append(f"--components={args.components}: expected a comma-separated list of {', '.join(COMPONENTS)}")
    runs = runs_of(args.dtype, args.matmul_precision, problems)
    if args.num_images < 1:
        problems.append(f"--num_images={args.num_images}: give 1 or more")
    if args.deeplab_geometry not in DEEPLAB_GEOMETRIES:
        problems.append(f"--deeplab_geometry={args.deeplab_geometry}: expected one of {', '.join(DEEPLAB_GEOMETRIES)}")
    if args.deeplab_size < 33:
        problems.append(f"--deeplab_size={args.deeplab_size}: give 33 or more pixels (UniMatch uses 321 / 513)")
    section, options = _label_section(args.config, args.classes, args.max_side, problems)
    # None when the settings could not be read (that problem is reported; no second one follows from it)
    allow_custom = bool(section.get("sam_allow_custom", False)) if section is not None else None
    model_name = args.clip_model_name or (section.get("clip_model_name", "") if section is not None else "")
    reference_name = args.clip_reference_model_name or model_name
    # Without --sam / --clip, the checkpoints the label settings name (label.sam_checkpoint / clip_checkpoint).
    sam_path = args.sam or (section.get("sam_checkpoint", "") if section is not None else "")
    clip_path = args.clip or (section.get("clip_checkpoint", "") if section is not None else "")
    sam = clip = None
    if {"sam", "amg", "label"} & set(components):
        sam = _sam_files(sam_path, args.sam_reference, allow_custom, problems)
    if {"clip", "label"} & set(components):
        clip = _clip_files(clip_path, args.clip_reference, model_name, reference_name, problems)
    deeplab = (_deeplab_files(args.deeplab, args.deeplab_reference, args.deeplab_geometry, problems)
               if "deeplab" in components else None)
    images = load_images(args.images, args.num_images, problems) if args.images else []
    if not args.images:
        problems.append("--images: give a folder of images or image files (comma-separated)")
    if problems:
        raise cli.UsageError("\n".join(problems))
    images = [(name, work_image(image, options)) for name, image in images]
    out_dir = os.path.abspath(os.path.expanduser(args.out))
    return Setup(images=images, options=options, components=components, runs=runs, sam=sam, clip=clip,
                 deeplab=deeplab, clip_model_name=model_name, clip_reference_model_name=reference_name,
                 deeplab_size=args.deeplab_size, deeplab_geometry=DEEPLAB_GEOMETRIES.get(args.deeplab_geometry, {}),
                 sam_allow_custom=bool(allow_custom), attention=str(section.get("attention", "auto")), out_dir=out_dir,
                 cache_dir=os.path.join(out_dir, "checkpoints"), label_section=section)

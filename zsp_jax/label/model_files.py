"""Loading the labeller's SAM and CLIP checkpoints: converted files, or PyTorch files converted once.

``label.sam_checkpoint`` / ``label.clip_checkpoint`` (``--sam`` / ``--clip``) may name

* a converted ``.safetensors`` (``tools/convert_sam.py`` / ``tools/convert_clip.py``), loaded
  without torch; or
* the file users of the PyTorch originals already have (``sam_vit_h_4b8939.pth``; OpenAI's
  ``ViT-B-16.pt``, an open_clip checkpoint or a transformers directory), converted on first use
  into ``<out>/checkpoints/`` (needs torch) and reused while the source is unchanged (its size
  and modification time are recorded beside the converted file).

Every problem (not set, missing, unreadable, the wrong kind of model, torch missing for a
conversion) raises ``CheckpointError`` with one message that says what to download and how to
convert it.
"""

from __future__ import annotations

import os
from typing import Any

from zsp_jax.utils.converted_files import convert_once, converted_path
from zsp_jax.utils.weights import read_metadata

SAM_HELP = ("download a segment-anything checkpoint, e.g. https://dl.fbaipublicfiles.com/segment_anything/"
            "sam_vit_h_4b8939.pth (ViT-H, the default) or .../sam_vit_b_01ec64.pth (ViT-B), and pass it as "
            "--sam / label.sam_checkpoint; it is converted on first use (needs torch), or convert it once with "
            "'python tools/convert_sam.py sam_vit_h_4b8939.pth weights/sam_vit_h.safetensors'")
CLIP_HELP = ("download a CLIP ViT checkpoint, e.g. OpenAI's ViT-B-16.pt (https://openaipublic.azureedge.net/clip/"
             "models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt, GEM's "
             "default model) or open_clip's / transformers' openai/clip-vit-base-patch16, and pass it as --clip / "
             "label.clip_checkpoint; it is converted on first use (needs torch), or convert it once with "
             "'python tools/convert_clip.py ViT-B-16.pt weights/clip_vit_b16.safetensors'")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says what to do."""


def _check_exists(path: str, what: str, help_text: str) -> str:
    if not path:
        raise CheckpointError(f"no {what} checkpoint given: {help_text}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} checkpoint {path} not found: {help_text}")
    return path


def _convert(what: str, help_text: str, fn: Any) -> Any:
    try:
        return fn()
    except ImportError as e:
        raise CheckpointError(f"converting the {what} checkpoint needs torch ({e}): install it with "
                              "'pip install torch==2.13.0', or convert the file on a machine that has it with "
                              f"tools/convert_{what.lower()}.py and pass the .safetensors") from None


def sam_safetensors(path: str, cache_dir: str, *, allow_custom: bool = False, log: Any = print) -> str:
    """A converted SAM file for ``path`` (itself, or a conversion cached in ``cache_dir``).

    ``allow_custom`` accepts architectures other than vit_b / vit_l / vit_h (off by default, so a
    truncated checkpoint is refused rather than converted into a smaller model).
    """
    from zsp_jax.utils.weights import ConversionError

    path = _check_exists(path, "SAM", SAM_HELP)
    if path.endswith(".safetensors"):
        return path

    def convert(out: str) -> None:
        from zsp_jax.models.sam.convert import convert_checkpoint

        convert_checkpoint(path, out, allow_custom=allow_custom)

    try:
        return _convert("SAM", SAM_HELP, lambda: convert_once(path, converted_path(path, cache_dir), convert, log=log))
    except ConversionError as e:
        raise CheckpointError(f"{path} is not a usable segment-anything checkpoint: {e}; {SAM_HELP}") from None


def load_sam_checkpoint(path: str, cache_dir: str, *, dtype: Any, allow_custom: bool = False,
                        attention: str = "auto") -> Any:
    """(Sam, SamConfig) from any accepted SAM checkpoint; ``attention`` as ``Sam``'s."""
    from zsp_jax.models.sam import load_sam
    from zsp_jax.utils.weights import ConversionError

    converted = sam_safetensors(path, cache_dir, allow_custom=allow_custom)
    try:
        return load_sam(converted, dtype=dtype, param_dtype=dtype, attention=attention)
    except (ConversionError, OSError, ValueError) as e:
        raise CheckpointError(f"{converted} is not a converted SAM checkpoint: {e}; {SAM_HELP}") from None


def clip_safetensors(path: str, cache_dir: str, *, model_name: str = "", log: Any = print) -> str:
    """A converted CLIP file for ``path`` (itself, or a conversion cached in ``cache_dir``), with the
    tokenizer vocabulary beside it when the source has one."""
    from zsp_jax.utils.weights import ConversionError

    path = _check_exists(path, "CLIP", CLIP_HELP)
    if path.endswith(".safetensors"):
        return path

    def convert(out: str) -> None:
        from zsp_jax.models.clip import convert as clip_convert

        clip_convert.save_clip(out, clip_convert.convert_checkpoint(path, model_name=model_name or None))

    try:
        return _convert("CLIP", CLIP_HELP, lambda: convert_once(path, converted_path(path, cache_dir), convert, log=log))
    except (ConversionError, FileNotFoundError) as e:
        raise CheckpointError(f"{path} is not a usable CLIP checkpoint: {e}; {CLIP_HELP}") from None


def load_clip_checkpoint(path: str, cache_dir: str, *, model_name: str = "", dtype: Any,
                         attention: str = "auto") -> tuple[Any, Any]:
    """(ClipModel, ClipTokenizer) from any accepted CLIP checkpoint; ``attention`` as ``ClipModel``'s.

    The vocabulary is the ``<file>.tokenizer/`` directory ``tools/convert_clip.py`` writes when
    present, else the one that ships with open_clip (``ClipTokenizer.load()``).
    """
    from zsp_jax.models.clip import ClipTokenizer, load_clip
    from zsp_jax.utils.weights import ConversionError

    converted = clip_safetensors(path, cache_dir, model_name=model_name)
    try:
        model = load_clip(converted, dtype=dtype, attention=attention)
    except (ConversionError, OSError, ValueError) as e:
        raise CheckpointError(f"{converted} is not a converted CLIP checkpoint: {e}; {CLIP_HELP}") from None
    vocab_dir = converted[: -len(".safetensors")] + ".tokenizer"
    try:
        tokenizer = ClipTokenizer.load(vocab_dir if os.path.isdir(vocab_dir) else None,
                                       context_length=model.config.context_length)
    except FileNotFoundError as e:
        raise CheckpointError(f"no CLIP vocabulary: {e}; convert the checkpoint with tools/convert_clip.py, which "
                              "writes the vocabulary beside it") from None
    return model, tokenizer


def describe_sam(path: str) -> str:
    """The SAM variant a checkpoint holds (``vit_h``, ``vit_b``, ``custom``, ...), read from metadata or
    tensor shapes only; raises ``CheckpointError`` saying what is wrong and what to download."""
    path = _check_exists(path, "SAM", SAM_HELP)
    try:
        if path.endswith(".safetensors"):
            meta = read_metadata(path)
            if meta.get("zsp_jax.model") != "sam":
                raise ValueError(f"a converted {meta.get('zsp_jax.model', 'unknown')!r} file, not SAM")
            return meta.get("zsp_jax.variant", "custom")
        from zsp_jax.models.sam.convert import infer_config
        from zsp_jax.utils import weights

        sd = weights.unwrap_state_dict(weights.load_torch_checkpoint(path), path=path)
        return infer_config(sd, source_name=path).name
    except ImportError as e:
        raise CheckpointError(f"{path}: reading a PyTorch checkpoint needs torch ({e}): 'pip install torch==2.13.0', "
                              "or convert it elsewhere with tools/convert_sam.py") from None
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise CheckpointError(f"{path} is not a usable segment-anything checkpoint ({e}); {SAM_HELP}") from None


def describe_clip(path: str, model_name: str = "") -> str:
    """The CLIP variant a checkpoint holds (``vit_b16``, ...), from metadata or shapes only; raises
    ``CheckpointError`` like ``describe_sam``."""
    path = _check_exists(path, "CLIP", CLIP_HELP)
    try:
        if path.endswith(".safetensors"):
            meta = read_metadata(path)
            if meta.get("zsp_jax.model") != "clip":
                raise ValueError(f"a converted {meta.get('zsp_jax.model', 'unknown')!r} file, not CLIP")
            return meta.get("zsp_jax.variant", "custom")
        from zsp_jax.models.clip import convert as clip_convert

        fmt = clip_convert.detect_format(path)
        if fmt == "hf":
            config, _ = clip_convert.read_hf_directory(path)
        else:
            sd = clip_convert.read_torch_file(path)
            fmt = clip_convert.detect_format(path, sd)
            if fmt == "open_clip":
                if not model_name:  # the activation is not in the file (as convert_state_dict refuses)
                    raise CheckpointError(
                        f"{path}: an open_clip state_dict does not record its activation; give its open_clip model "
                        f"name with --clip_model_name (label.clip_model_name): ViT-B-16-quickgelu for OpenAI's "
                        f"weights (QuickGELU), ViT-B-16 for open_clip's LAION / DataComp weights (GELU)")
                sd = clip_convert.normalize_open_clip_keys(sd)
            config = clip_convert.config_from_openai_state_dict(sd, act="gelu", source_name=path,
                                                                model_name=model_name or None)
        return config.variant_name()
    except ImportError as e:
        raise CheckpointError(f"{path}: reading a PyTorch checkpoint needs torch ({e}): 'pip install torch==2.13.0', "
                              "or convert it elsewhere with tools/convert_clip.py") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a usable CLIP checkpoint ({e}); {CLIP_HELP}") from None

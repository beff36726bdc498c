"""Image and mask decoding with the bad-input checks: bytes -> uint8 numpy arrays.

PIL decodes (it handles every common format and mode, raises on truncated files instead of
returning half an image, and is what UniMatch uses, so pixels match the reference).

Images: any PIL mode becomes RGB (grayscale is replicated, alpha is dropped as
``Image.convert('RGB')`` does in the reference, CMYK is converted, 16-bit is scaled to 8 bits).
EXIF orientation is applied only when asked (``exif=True``, used for plain folders of photos):
annotated layouts (VOC, COCO) use the pixels as stored, like the reference and the annotation
tools, so that masks stay aligned.

Masks: single-channel PNGs (palette indices or grayscale), values in ``[0, num_classes)`` or
255 (ignore). Colour masks, values outside the class range and sizes that differ from the
image raise ``BadInputError`` naming the file.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from zsp_jax.data.bad_input import BadInputError

IGNORE_LABEL = 255
_MASK_MODES_8BIT = ("P", "L")
_MASK_MODES_WIDE = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _open(data: bytes, path: str) -> Image.Image:
    if len(data) == 0:
        raise BadInputError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning etc.: the checks below decide
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
        raise BadInputError(path, f"cannot decode: {type(e).__name__}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise BadInputError(path, f"image has zero size {img.size}")
    return img


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8. 8-bit ranges are kept, 16-bit ranges scaled."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
        return arr.astype(np.uint8)
    arr = np.clip(arr, 0, 65535)
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)


def decode_image(data: bytes, path: str = "<bytes>", *, exif: bool = False) -> np.ndarray:
    """Decodes an encoded image to RGB.

    Args:
      data: the file's bytes (JPEG, PNG, BMP, TIFF, WebP, ...).
      path: the file name, for error messages.
      exif: apply the EXIF orientation tag (rotate/flip to the displayed orientation).

    Returns:
      uint8 array (H, W, 3), values 0..255.

    Raises:
      BadInputError: empty, truncated or undecodable file.
    """
    img = _open(data, path)
    if exif:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # noqa: BLE001 - a broken EXIF block
            raise BadInputError(path, f"cannot apply EXIF orientation: {e}") from e
    mode = img.mode
    if mode in _MASK_MODES_WIDE or mode == "F":
        gray = _wide_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        img = img.convert("RGB")
    out = np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)
    if out.ndim != 3 or out.shape[-1] != 3:
        raise BadInputError(path, f"unexpected decoded shape {out.shape} (mode {mode})")
    return out


def decode_mask(data: bytes, path: str = "<bytes>", *, num_classes: int | None = None) -> np.ndarray:
    """Decodes a class-index mask.

    Args:
      data: the file's bytes; a single-channel PNG (palette or grayscale, 8 or 16 bits).
      path: the file name, for error messages.
      num_classes: if given, every value must be in ``[0, num_classes)`` or 255.

    Returns:
      uint8 array (H, W) of class indices, 255 = ignore.

    Raises:
      BadInputError: undecodable, colour, or out-of-range mask.
    """
    img = _open(data, path)
    if img.mode in _MASK_MODES_8BIT:
        out = np.array(img, dtype=np.uint8)
    elif img.mode in _MASK_MODES_WIDE:
        wide = np.asarray(img).astype(np.int64)
        if wide.min(initial=0) < 0 or wide.max(initial=0) > 255:
            raise BadInputError(path, f"mask values span {wide.min()}..{wide.max()}; expected 0..255")
        out = wide.astype(np.uint8)
    else:
        raise BadInputError(path, f"mask has mode {img.mode} ({len(img.getbands())} channels); expected class "
                                  "indices in a single-channel PNG (palette or grayscale)")
    if num_classes is not None:
        check_labels(out, num_classes, path)
    return out


def image_size(path: str, *, exif: bool = False) -> tuple[int, int]:
    """(H, W) of an image file read from its header only (no pixel decode); with ``exif``, as
    displayed after the EXIF orientation. Raises ``BadInputError`` naming the file."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if exif and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # the orientations that transpose
                w, h = h, w
    except OSError as e:
        raise BadInputError(path, f"cannot read the image header: {e}") from e
    return h, w


def check_labels(mask: np.ndarray, num_classes: int, path: str = "<mask>") -> None:
    """Raises ``BadInputError`` if ``mask`` (uint8) holds a value >= num_classes other than 255."""
    counts = np.bincount(mask.reshape(-1), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if num_classes <= v != IGNORE_LABEL]
    if bad:
        raise BadInputError(path, f"label values {[int(v) for v in bad]} outside 0..{num_classes - 1} "
                                  f"(255 = ignore)")


def check_same_size(image: np.ndarray, mask: np.ndarray, mask_path: str) -> None:
    """Raises ``BadInputError`` naming the mask if its (H, W) differs from the image's."""
    if image.shape[:2] != mask.shape[:2]:
        raise BadInputError(mask_path, f"mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from its "
                                       f"image's {image.shape[1]}x{image.shape[0]}")


def decode_pair(image_data: bytes, mask_data: bytes | None, image_name: str, mask_name: str, *, exif: bool = False,
                num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes an image and (if ``mask_data``) its mask, running every check of this module.

    Returns (uint8 (H, W, 3), uint8 (H, W) or None). Errors name ``image_name`` / ``mask_name``.
    The one decode path of the pre-training scan and of the training / evaluation pipelines.
    """
    image = decode_image(image_data, image_name, exif=exif)
    if not mask_data:
        return image, None
    mask = decode_mask(mask_data, mask_name, num_classes=num_classes)
    check_same_size(image, mask, mask_name)
    return image, mask


def encode_png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes; a (256, 3) palette makes a palette PNG."""
    array = np.ascontiguousarray(array, np.uint8)
    if palette is not None:
        if array.ndim != 2:
            raise ValueError(f"a palette PNG needs a (H, W) array, got {array.shape}")
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    else:
        img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

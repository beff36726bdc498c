"""Bad and unusual input files for the data-layer tests (item 5 of the data issue).

Each function writes one file and returns its path. Byte-level details are chosen so that the
file is what its name says (e.g. the CMYK JPEG really is stored as CMYK, the 16-bit PNG really
has 16-bit samples), which the tests check before relying on it.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def _save(img: Image.Image, path: str, fmt: str, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def rgb_array(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """A smooth uint8 (h, w, 3) test picture (gradients, so JPEG keeps it close)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    img = np.stack([base[0] + xx * 100 // w, base[1] + yy * 100 // h, base[2] + (xx + yy) * 50 // (h + w)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def zero_byte(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return path


def truncated_jpeg(path: str, h: int = 40, w: int = 56) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb_array(h, w)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def not_an_image(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not an image\n" * 10)
    return path


def cmyk_jpeg(path: str, h: int = 40, w: int = 56) -> str:
    return _save(Image.fromarray(rgb_array(h, w)).convert("CMYK"), path, "JPEG", quality=95)


def gray16_png(path: str, h: int = 40, w: int = 56) -> str:
    """16-bit grayscale PNG whose value v8 * 257 maps back to v8 in 8 bits."""
    v8 = rgb_array(h, w)[..., 0].astype(np.uint16)
    return _save(Image.fromarray(v8 * 257), path, "PNG")


def rgba_png(path: str, h: int = 40, w: int = 56) -> str:
    rgb = rgb_array(h, w)
    alpha = np.full((h, w, 1), 128, np.uint8)
    return _save(Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), path, "PNG")


def gray_jpeg(path: str, h: int = 40, w: int = 56) -> str:
    return _save(Image.fromarray(rgb_array(h, w)[..., 1]), path, "JPEG", quality=95)


def exif_rotated_jpeg(path: str, h: int = 40, w: int = 56, orientation: int = 6) -> str:
    """A JPEG stored h x w with EXIF orientation ``orientation`` (6: display rotated 90 degrees clockwise)."""
    img = Image.fromarray(rgb_array(h, w))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, path, "JPEG", quality=95, exif=exif.tobytes())


def mask_png(path: str, mask: np.ndarray) -> str:
    return _save(Image.fromarray(np.asarray(mask, np.uint8)), path, "PNG")


def rgb_mask_png(path: str, h: int = 40, w: int = 56) -> str:
    """A colour-coded (RGB) mask, as people sometimes save VOC masks by mistake."""
    return _save(Image.fromarray(rgb_array(h, w)), path, "PNG")

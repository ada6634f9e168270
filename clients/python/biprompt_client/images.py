"""Turning what callers hold (a path, bytes, a PIL image, a numpy array) into encoded image bytes.

Encoded files (paths, bytes) are sent as they are; in-memory images are encoded as PNG, which
is deterministic, so the same pixels always give the same bytes and the same image_id.

Coordinates, sizes and masks are in the image as displayed: the server applies EXIF orientation
when it decodes, and so does everything here that looks at pixels or sizes locally (`image_size`,
`load_image_array`, a PIL image's PNG). Bytes that are sent are never re-encoded, so the image_id
stays the sha256 of what the caller holds.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = ["ImageInput", "image_size", "load_image_array", "load_image_bytes"]

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

_ACCEPTED = ("a path (str or Path), encoded bytes, a PIL.Image, or a numpy uint8 array of shape "
             "HxW (grey) or HxWx3 (RGB)")
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_ORIENTATION = ExifTags.Base.Orientation
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the image by 90 degrees
# where PIL finds a PNG's orientation: the eXIf chunk, ImageMagick's text chunk, XMP
_PNG_ORIENTATION_CHUNKS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def load_image_bytes(image: Any) -> bytes:
    """Encoded image bytes for `image` (see the module docstring for what is accepted)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return data
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise FileNotFoundError(f"image path {str(path)!r} {what}")
        return path.read_bytes()
    if isinstance(image, Image.Image):
        image = _displayed(image)
        return _png(image if image.mode in _PNG_MODES else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _png(Image.fromarray(_check_array(image)))
    raise TypeError(f"unsupported image type {type(image).__name__}; give {_ACCEPTED}")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes as displayed (EXIF orientation applied), read from
    the header without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        # NOTE: PIL reads a PNG's EXIF by decoding the whole image unless it comes before the
        # pixels; only pay for that when the bytes could hold an orientation at all.
        if img.format == "PNG" and "exif" not in img.info and not any(
                marker in data for marker in _PNG_ORIENTATION_CHUNKS):
            return h, w
        if _orientation(img) in _SWAPS_SIDES:
            return w, h
    return h, w


def load_image_array(image: Any) -> np.ndarray:
    """An HxWx3 uint8 RGB array of `image` as displayed (what the server segments): files, bytes
    and PIL images with EXIF orientation applied; arrays as given (grey replicated to RGB)."""
    if isinstance(image, np.ndarray):
        arr = _check_array(image)
        return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
    if not isinstance(image, Image.Image):
        with Image.open(io.BytesIO(load_image_bytes(image))) as img:
            return np.asarray(_displayed(img).convert("RGB"))
    return np.asarray(_displayed(image).convert("RGB"))


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: shown unrotated, as the server does
        return 1


def _displayed(img: Image.Image) -> Image.Image:
    return ImageOps.exif_transpose(img) if _orientation(img) in range(2, 9) else img


def _check_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ValueError(f"image array has dtype {arr.dtype}; give {_ACCEPTED} "
                         "(convert with e.g. (x * 255).clip(0, 255).astype(np.uint8))")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image array has shape {arr.shape}; give {_ACCEPTED}")
    if arr.size == 0:
        raise ValueError(f"image array is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # PIL writes no timestamps: deterministic
    return buf.getvalue()

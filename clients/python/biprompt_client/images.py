"""Turning what callers hold (a path, bytes, a PIL image, a numpy array) into encoded image bytes.

Encoded files (paths, bytes) are sent as they are; in-memory images are encoded as PNG, which
is deterministic, so the same pixels always give the same bytes and the same image_id.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ImageInput", "image_size", "load_image_bytes"]

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

_ACCEPTED = ("a path (str or Path), encoded bytes, a PIL.Image, or a numpy uint8 array of shape "
             "HxW (grey) or HxWx3 (RGB)")
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


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
        return _png(image if image.mode in _PNG_MODES else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _png(Image.fromarray(_check_array(image)))
    raise TypeError(f"unsupported image type {type(image).__name__}; give {_ACCEPTED}")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes, read from the header only."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    return h, w


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

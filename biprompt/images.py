"""Turning whatever a caller hands us into an HxWx3 uint8 RGB array, or a clear error.

Policy (decided here, reported to callers through `ImageInfo.converted`):
- 8-bit grayscale (HxW, HxWx1, PIL "L"/"P"/"LA") is replicated to RGB; RGBA drops alpha;
  palette and CMYK PIL images are converted by PIL. These are lossless or near-lossless.
- 16-bit, float, bool and other dtypes are rejected: their value range is not ours to guess
  (12-bit data in 16-bit containers is common). The error says how to convert.
- EXIF orientation is applied (encoded bytes, paths and PIL images): the array, its size, and so
  every coordinate and mask, are in the image as displayed, not as the sensor stored it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from biprompt.config import DEFAULT_MAX_PIXELS
from biprompt.errors import InvalidImageError, PayloadTooLargeError

MIN_SIDE = 2


@dataclass(frozen=True)
class ImageInfo:
    height: int
    width: int
    converted: str | None  # e.g. "grayscale->rgb", "rgba->rgb"; None when already RGB uint8


def _check_size(h: int, w: int, max_pixels: int) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InvalidImageError(f"image is {w}x{h} pixels; both sides must be at least {MIN_SIDE}")
    if h * w > max_pixels:
        raise PayloadTooLargeError(
            f"image has {h * w} pixels ({w}x{h}); the limit is {max_pixels}. Downscale it first."
        )


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = as stored). Unreadable EXIF counts as 1, as viewers
    show such an image unrotated."""
    try:
        value = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a viewable image fail
        return 1
    return value if 1 <= value <= 8 else 1


def displayed(img: Image.Image) -> Image.Image:
    """`img` as viewers display it: EXIF orientation applied (the same image when there is none).
    Pixel counts and the set of side lengths do not change, so size limits read from the header
    hold for the result."""
    if exif_orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _from_pil(img: Image.Image, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    _check_size(img.size[1], img.size[0], max_pixels)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F") or mode.startswith("I;"):
        raise InvalidImageError(
            f"{mode} images (16/32-bit or float) are not accepted: convert to 8-bit RGB first, "
            "e.g. np.clip(img / img.max() * 255, 0, 255).astype(np.uint8)"
        )
    img = displayed(img)
    w, h = img.size
    converted = None if mode == "RGB" else f"{mode.lower()}->rgb"
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy(), ImageInfo(h, w, converted)


def _from_array(arr: np.ndarray, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    if arr.dtype != np.uint8:
        raise InvalidImageError(
            f"image arrays must be uint8 with values 0-255, got {arr.dtype}; 16-bit, float and "
            "bool images are not accepted (their range is ambiguous): convert to uint8 first"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        _check_size(*arr.shape, max_pixels)
        rgb = np.repeat(arr[..., None], 3, axis=2)
        return rgb, ImageInfo(arr.shape[0], arr.shape[1], "grayscale->rgb")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InvalidImageError(
            f"image array must be HxW, HxWx3 (RGB) or HxWx4 (RGBA), got shape {tuple(arr.shape)}"
        )
    _check_size(arr.shape[0], arr.shape[1], max_pixels)
    if arr.shape[2] == 4:
        return np.ascontiguousarray(arr[..., :3]), ImageInfo(*arr.shape[:2], "rgba->rgb")
    return np.ascontiguousarray(arr), ImageInfo(arr.shape[0], arr.shape[1], None)


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) to RGB uint8, EXIF orientation applied.
    Size limits are checked from the header, before any pixel is decoded."""
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        _check_size(h, w, max_pixels)  # before decoding pixels: no decompression bombs
        img.load()
    except PayloadTooLargeError:
        raise  # a ValueError too: must not become "could not decode"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"could not decode the image bytes: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(str(exc)) from None
    return _from_pil(img, max_pixels)


def to_rgb_array(image: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Coerce a path, encoded bytes, a PIL image or an array to an HxWx3 uint8 RGB array. Files,
    bytes and PIL images come out as displayed (EXIF orientation applied); arrays as given."""
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(image), max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InvalidImageError(f"image file not found: {path}")
        return decode_image_bytes(path.read_bytes(), max_pixels)
    try:  # torch tensors and other array-likes
        arr = np.asarray(image)
    except Exception:
        arr = None
    if arr is None or arr.dtype == object:
        raise InvalidImageError(
            f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image "
            "or an HxWx3 uint8 array"
        )
    return _from_array(arr, max_pixels)

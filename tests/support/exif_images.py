"""Images with an EXIF orientation, written the way cameras write them: the sensor's pixels plus
a tag saying how to turn them for display. Shared by the unit and integration tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image

H, W = 240, 320  # as displayed: landscape


def displayed_image(h: int = H, w: int = W) -> np.ndarray:
    """Smooth gradients (JPEG keeps them) with a bright block in the top-left quarter, so every
    rotation and flip gives a different array."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 90)], axis=-1)
    img[h // 8 : h // 3, w // 8 : w // 3] = (250, 250, 40)
    return img.astype(np.uint8)


def stored(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The sensor's array: what a camera writes so that `orientation` displays as `displayed`
    (the EXIF definitions, written out with numpy, independent of PIL's transposes)."""
    t = displayed.transpose(1, 0, 2)
    return {
        1: displayed,
        2: displayed[:, ::-1],
        3: displayed[::-1, ::-1],
        4: displayed[::-1],
        5: t,
        6: np.rot90(displayed, 1),  # displayed = stored turned 90 degrees clockwise
        7: t[::-1, ::-1],
        8: np.rot90(displayed, -1),
    }[orientation]


def unstore(sensor: np.ndarray, orientation: int) -> np.ndarray:
    """The inverse of `stored`: the displayed array of a sensor array."""
    t = sensor.transpose(1, 0, 2)
    return {
        1: sensor,
        2: sensor[:, ::-1],
        3: sensor[::-1, ::-1],
        4: sensor[::-1],
        5: t,
        6: np.rot90(sensor, -1),
        7: t[::-1, ::-1],
        8: np.rot90(sensor, 1),
    }[orientation]


def encode(sensor: np.ndarray, orientation: int | None, fmt: str = "JPEG") -> bytes:
    """`sensor` as JPEG or PNG bytes, with an EXIF orientation tag unless None."""
    opts = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        opts["exif"] = exif.tobytes()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(sensor)).save(buf, format=fmt, **opts)
    return buf.getvalue()


def rotated_jpeg(orientation: int, displayed: np.ndarray | None = None) -> bytes:
    disp = displayed_image() if displayed is None else displayed
    return encode(stored(disp, orientation), orientation)


def sensor_pixels(data: bytes) -> np.ndarray:
    """The stored pixels, orientation ignored, decoded by the same PIL decoder."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))

"""Small synthetic test images: noisy backgrounds with a few flat rectangles, distinct per seed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def scene(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """A noisy image with a few flat rectangles: distinct per seed."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 60), rng.integers(0, w - 80)
        img[y : y + 50, x : x + 70] = rng.integers(100, 255, size=3)
    return img

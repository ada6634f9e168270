"""Drawing a mask, its prompt points and the text over the image, for people to check by eye."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

MASK_RGB = (30, 144, 255)
FG_RGB = (0, 230, 0)
BG_RGB = (230, 0, 0)


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    points: Sequence[Sequence[float]] = (),
    labels: Sequence[int] | None = None,
    text: str | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """image: HxWx3 uint8; mask: HxW bool. Foreground points green, background points red; the
    mask is tinted blue with its outline drawn opaque; the text is printed in a band at the top."""
    img = np.asarray(image, dtype=np.uint8)[..., :3].astype(np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match image {img.shape[:2]}")
    tint = np.array(MASK_RGB, dtype=np.float32)
    img[m] = (1 - alpha) * img[m] + alpha * tint
    edge = m & ~(
        np.pad(m, 1, mode="edge")[:-2, 1:-1] & np.pad(m, 1, mode="edge")[2:, 1:-1]
        & np.pad(m, 1, mode="edge")[1:-1, :-2] & np.pad(m, 1, mode="edge")[1:-1, 2:]
    )
    img[edge] = tint
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(3, round(min(out.size) / 80))
    for i, (x, y) in enumerate(points):
        fg = labels is None or int(labels[i]) == 1
        draw.ellipse((x - r, y - r, x + r, y + r), fill=FG_RGB if fg else BG_RGB,
                     outline=(255, 255, 255), width=max(1, r // 3))
    if text:
        draw.rectangle((0, 0, out.size[0], 14), fill=(0, 0, 0))
        draw.text((3, 1), text, fill=(255, 255, 255))
    return out


def grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Tile same-size images into one picture."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    out = Image.new("RGB", (w * columns, h * rows), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out

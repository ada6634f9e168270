"""Model inputs: SAM's resize-longest-side + normalise + pad, BEiT-3's 224x224 view, and prompt
coordinates mapped into the model's input frame.

SAM's image path goes through segment-anything's own `ResizeLongestSide` (a PIL bilinear resize of
the uint8 image) and `Sam.preprocess`, so embeddings match `SamPredictor.set_image` exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from biprompt.errors import InvalidImageError
from biprompt.images import MIN_SIDE

# Bump when any preprocessing step changes: it is part of every embedding cache key.
# 2: EXIF orientation applied at decode (embeddings of rotated photos cached before it are
# in sensor orientation, under the same image id).
PREPROCESS_VERSION = 2

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def sam_input_size(original_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to img_size, as SAM rounds it."""
    return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)


def max_aspect_ratio(img_size: int) -> int:
    """The most elongated image (long side / short side) SAM's resize leaves >= 1 pixel wide:
    the short side rounds to int(short * img_size / long + 0.5), which is 0 beyond 2 * img_size."""
    return 2 * img_size


def check_model_input(original_size: tuple[int, int], img_size: int) -> None:
    """Raise InvalidImageError for an (h, w) image the models cannot take. Cheap: call it before
    an image joins a batch, so it fails alone.

    Both sides must be at least MIN_SIDE (as at decode); SAM's resized image (longest side = img_size) must keep both sides >= 1 pixel. BEiT-3's view
    (`beit3_input`) is a square resize of the whole image, text_size pixels a side whatever the
    aspect ratio, so it adds no limit of its own.
    """
    h, w = original_size
    if min(h, w) < MIN_SIDE:
        raise InvalidImageError(f"image is {w}x{h} pixels; both sides must be at least {MIN_SIDE}")
    rh, rw = sam_input_size((h, w), img_size)
    if min(rh, rw) < 1:
        raise InvalidImageError(
            f"image is {w}x{h} pixels: too thin for this model. SAM resizes its longest side to "
            f"{img_size}, which leaves the short side at 0 pixels; this model accepts aspect "
            f"ratios up to {max_aspect_ratio(img_size)}:1 (long side / short side). Pad or crop "
            "the image first."
        )


def sam_resize(image: np.ndarray, img_size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xhxw float tensor (unnormalised, unpadded), longest side = img_size."""
    resized = ResizeLongestSide(img_size).apply_image(image)
    return torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()


def sam_normalize_pad(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """Bx3xhxw float (0-255) -> Bx3xSxS normalised and zero-padded bottom/right (Sam.preprocess)."""
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def beit3_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xSxS: [0,1], bicubic resize without antialiasing or clamping, then
    normalised with mean = std = 0.5 (EVF-SAM's torchvision pipeline on a float tensor)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return (x - 0.5) / 0.5


def transform_coords(coords: np.ndarray, original_size: tuple[int, int], img_size: int) -> np.ndarray:
    """XY pixel coordinates in the original image -> the resized model-input frame (...x2)."""
    return ResizeLongestSide(img_size).apply_coords(np.asarray(coords, dtype=np.float64), original_size)


def transform_boxes(boxes: np.ndarray, original_size: tuple[int, int], img_size: int) -> np.ndarray:
    """XYXY boxes (Bx4) in the original image -> the model-input frame."""
    return ResizeLongestSide(img_size).apply_boxes(np.asarray(boxes, dtype=np.float64), original_size)

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

# Bump when any preprocessing step changes: it is part of every embedding cache key.
PREPROCESS_VERSION = 1

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def sam_input_size(original_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to img_size, as SAM rounds it."""
    return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)


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

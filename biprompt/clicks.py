"""The automatic clicker of the interactive-segmentation protocol (RITM, SimpleClick, SAM-REF):
the next click goes to the interior of the largest error region, at its point farthest from the
region's boundary; positive in a false-negative region, negative in a false-positive one.

The first click is the same rule against an empty prediction: the point of the object farthest
from its boundary. Used by `biprompt eval clicks` and by the demo model's refinement training.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest 8-connected component of a bool mask, and its area (0 if none)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask), 0
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == k, int(stats[k, cv2.CC_STAT_AREA])


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of `region` farthest from its boundary (the image border counts as
    boundary: the region is padded with background)."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The next click for prediction `pred` against ground truth `gt` (HxW bool), or None when
    they agree everywhere."""
    fn, fn_area = _largest_region(gt & ~pred)
    fp, fp_area = _largest_region(pred & ~gt)
    if fn_area == 0 and fp_area == 0:
        return None
    positive = fn_area >= fp_area
    x, y = interior_point(fn if positive else fp)
    return Click(x, y, positive)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0

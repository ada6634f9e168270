"""Binary mask -> simplified polygons with holes (the wire's `mask_format: "polygon"`).

OpenCV traces and simplifies; this module only fixes the convention the client rasterises back
(`biprompt_client.results.decode_mask`):

* Coordinates are pixel centres: vertex (x, y) is the centre of the pixel in column x, row y
  (x right, y down), so traced vertices are integers.
* Every ring runs through the centres of the pixels it bounds: an exterior through the region's
  outermost pixels, a hole through the outermost pixels of the hole (the background it cuts out).
  A pixel belongs to a region when its centre lies inside or on the exterior and neither inside
  nor on any of its holes. An island inside a hole is a region of its own.
* Rings are simplified by Douglas-Peucker (`cv2.approxPolyDP`): every traced vertex lies within
  `tolerance` pixels of the simplified ring. A ring that would keep fewer than 3 vertices keeps
  its traced ones; rings that trace to fewer than 3 (a lone pixel, a straight one-pixel-wide run,
  a pinhole of that shape) enclose no area as polygons and are left out.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from biprompt.config import POLYGON_TOLERANCE_PX

__all__ = ["mask_to_polygons"]

_MIN_VERTICES = 3


def mask_to_polygons(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE_PX) -> dict[str, Any]:
    """An HxW mask (bool, or integers: nonzero is foreground) -> {"size": [h, w], "polygons":
    [{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}, ...], "tolerance": t}, one item
    per 8-connected region, largest (traced exterior area) first."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {m.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    fg = np.ascontiguousarray(m != 0, dtype=np.uint8)
    h, w = fg.shape
    regions: list[tuple[float, dict]] = []
    if fg.any():
        # RETR_CCOMP: two levels, each component's outer boundary at the top (islands inside
        # holes too) and its holes' boundaries as its children
        contours, hierarchy = cv2.findContours(fg, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        links = hierarchy[0]  # per contour: next, previous, first child, parent
        for i, outer in enumerate(contours):
            if links[i][3] != -1:
                continue
            exterior = _simplify(outer, tolerance)
            if exterior is None:
                continue
            holes = []
            child = links[i][2]
            while child != -1:
                for ring in _hole_rings(contours[child], fg):
                    simplified = _simplify(ring, tolerance)
                    if simplified is not None:
                        holes.append(simplified)
                child = links[child][0]
            regions.append((cv2.contourArea(outer), {"exterior": exterior, "holes": holes}))
    regions.sort(key=lambda r: -r[0])
    return {"size": [int(h), int(w)], "polygons": [r for _, r in regions],
            "tolerance": float(tolerance)}


def _hole_rings(boundary: np.ndarray, fg: np.ndarray) -> list[np.ndarray]:
    """OpenCV traces a hole along the foreground pixels around it; the wire wants the ring
    through the hole's own outermost pixels: trace the background inside that boundary."""
    x, y, bw, bh = cv2.boundingRect(boundary)
    inside = np.zeros((bh, bw), dtype=np.uint8)
    cv2.drawContours(inside, [boundary], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
    inside &= 1 - fg[y : y + bh, x : x + bw]
    # NOTE: RETR_EXTERNAL leaves out the background inside islands within the hole; those are
    # the islands' own holes
    rings, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                offset=(x, y))
    return list(rings)


def _simplify(ring: np.ndarray, tolerance: float) -> list[list[int]] | None:
    """A traced ring (N x 1 x 2, int32) -> [[x, y], ...] with at least 3 vertices, or None."""
    if len(ring) < _MIN_VERTICES:
        return None
    simplified = cv2.approxPolyDP(ring, tolerance, True) if tolerance > 0 else ring
    if len(simplified) < _MIN_VERTICES:
        simplified = ring
    return simplified.reshape(-1, 2).tolist()

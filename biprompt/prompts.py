"""Validating prompts: XY points in original-image pixels, 0/1 labels, XYXY boxes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biprompt.config import MAX_POINTS, REFINE_MULTIMASK
from biprompt.errors import InvalidPromptError
from biprompt.selection import MODES


@dataclass(frozen=True)
class Prompt:
    """One segmentation request against one image.

    points: Nx2 float64, XY pixels in the original image; labels: (N,) int, 1 = foreground,
    0 = background; box: (4,) XYXY pixels or None; text: a referring expression or None;
    mask_input: the previous mask as SAM's LxL low-res logits (a refinement click) or None;
    multimask: SAM's three candidates (True) or its single-mask output (False).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    text: str | None = None
    mode: str = "biprompt"
    mask_input: np.ndarray | None = None
    multimask: bool = True

    @property
    def group_key(self) -> tuple[int, bool, bool, bool]:
        """Prompts with equal keys decode in one batched call."""
        return (len(self.points), self.box is not None, self.mask_input is not None,
                self.multimask)


def _finite(arr: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise InvalidPromptError(f"{what} contain NaN or infinite values")


def make_prompt(
    image_size: tuple[int, int],
    points=None,
    labels=None,
    *,
    box=None,
    text: str | None = None,
    mode: str = "biprompt",
    mask_input=None,
    multimask: bool | None = None,
) -> Prompt:
    """Check a prompt against an image of `image_size` = (h, w); raise InvalidPromptError.
    multimask None: `refinement_multimask` decides (biprompt.config.REFINE_MULTIMASK)."""
    h, w = image_size
    if mode not in MODES:
        raise InvalidPromptError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    try:
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidPromptError("points must be a list of [x, y] pairs of numbers") from None
    if pts.ndim == 1 and pts.shape == (2,):
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InvalidPromptError(f"points must be Nx2 ([[x, y], ...]), got shape {list(pts.shape)}")
    if len(pts) > MAX_POINTS:
        raise InvalidPromptError(f"{len(pts)} points; at most {MAX_POINTS} per prompt")
    _finite(pts, "points")
    outside = (pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)
    if outside.any():
        x, y = pts[int(np.argmax(outside))]
        raise InvalidPromptError(
            f"point ({x:g}, {y:g}) is outside the {w}x{h} image (x in [0, {w}), y in [0, {h}))"
        )
    if labels is None:
        lab = np.ones(len(pts), dtype=np.int64)
    else:
        try:
            lab_f = np.asarray(labels, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidPromptError("labels must be a list of 0/1 numbers") from None
        if len(lab_f) != len(pts):
            raise InvalidPromptError(f"{len(lab_f)} labels for {len(pts)} points: give one per point")
        _finite(lab_f, "labels")
        if not np.isin(lab_f, (0, 1)).all():
            raise InvalidPromptError("labels must be 1 (foreground) or 0 (background)")
        lab = lab_f.astype(np.int64)
    bx = None
    if box is not None:
        try:
            bx = np.asarray(box, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidPromptError("box must be [x0, y0, x1, y1]") from None
        if bx.shape != (4,):
            raise InvalidPromptError(f"box must be [x0, y0, x1, y1], got {bx.size} values")
        _finite(bx, "box coordinates")
        x0, y0, x1, y1 = bx
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise InvalidPromptError(
                f"box {bx.tolist()} must satisfy 0 <= x0 <= x1 <= {w} and 0 <= y0 <= y1 <= {h}"
            )
    if mode in ("biprompt", "point") and len(pts) == 0 and bx is None:
        raise InvalidPromptError(f"mode {mode!r} needs at least one point (or a box)")
    if mode == "text" and text is None:
        raise InvalidPromptError("mode 'text' needs a text expression")
    logits = None
    if mask_input is not None:
        logits = np.asarray(mask_input, dtype=np.float32)
        if logits.ndim == 3 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
            raise InvalidPromptError(f"mask_input must be SAM's square low-res logits (LxL), got "
                                     f"shape {list(logits.shape)}")
        _finite(logits, "mask_input logits")
    if multimask is None:
        multimask = refinement_multimask(mode, len(pts), logits is not None)
    return Prompt(pts, lab, bx, text, mode, logits, bool(multimask))


def refinement_multimask(mode: str, n_points: int, has_mask: bool) -> bool:
    """Whether a prompt asks SAM for its three candidates or its single mask.

    A first click (one point, no previous mask) is ambiguous: three candidates, and in biprompt
    mode the text picks. Once the mask is being refined (a previous mask, or several points),
    SAM's own practice is its single-mask output; REFINE_MULTIMASK[mode] says what each mode
    does then (measured: `biprompt eval clicks`, README)."""
    if not has_mask and n_points <= 1:
        return True
    return REFINE_MULTIMASK.get(mode, False)

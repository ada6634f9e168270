"""BiPrompt selection: which of SAM's three candidates the referring expression agrees with.

Rules (the paper states none of these; they are ours):
- biprompt: the candidate with the highest IoU against the text mask; ties (equal IoU) go to the
  higher predicted IoU, then to the lower index. If there is no text, the text mask is empty, or
  the best IoU is below `agreement_threshold`, the point is trusted over the words: SAM's top
  candidate is returned and `strategy` says why (`fallback_*`).
- point: SAM's top candidate (highest predicted IoU).
- text: the text mask itself; `selected` still names the best-agreeing candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("biprompt", "point", "text")
DEFAULT_AGREEMENT_THRESHOLD = 0.1


@dataclass(frozen=True)
class Selection:
    selected: int
    strategy: str  # biprompt | point | text | fallback_no_text | fallback_empty_text | fallback_low_agreement
    agreement: float | None  # IoU of the chosen candidate (biprompt: best) with the text mask
    text_ious: np.ndarray | None  # (K,) IoU of each candidate with the text mask


def mask_ious(candidates: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IoU of each of K HxW bool candidates with one HxW bool mask (0 where both are empty)."""
    c = candidates.reshape(candidates.shape[0], -1)
    m = mask.reshape(1, -1)
    inter = np.logical_and(c, m).sum(axis=1, dtype=np.int64)
    union = np.logical_or(c, m).sum(axis=1, dtype=np.int64)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _best(ious: np.ndarray, scores: np.ndarray) -> int:
    # lexsort: last key is primary; -index makes the lower index win a full tie
    order = np.lexsort((-np.arange(len(ious)), scores, ious))
    return int(order[-1])


def select(
    candidates: np.ndarray,
    scores: np.ndarray,
    text_mask: np.ndarray | None,
    mode: str = "biprompt",
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
) -> Selection:
    """candidates: KxHxW bool; scores: (K,) SAM's predicted IoUs; text_mask: HxW bool or None."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    scores = np.asarray(scores, dtype=np.float64)
    top = int(np.argmax(scores)) if len(scores) else 0
    if text_mask is None:
        if mode == "text":
            raise ValueError("mode 'text' needs a text mask")
        return Selection(top, "point" if mode == "point" else "fallback_no_text", None, None)
    ious = mask_ious(candidates, text_mask) if len(scores) else np.zeros(0)
    best = _best(ious, scores) if len(scores) else 0
    agreement = float(ious[best]) if len(scores) else None
    if mode == "point":
        return Selection(top, "point", float(ious[top]), ious)
    if mode == "text":
        return Selection(best, "text", agreement, ious)
    if not text_mask.any():
        return Selection(top, "fallback_empty_text", 0.0, ious)
    if agreement < agreement_threshold:
        return Selection(top, "fallback_low_agreement", agreement, ious)
    return Selection(best, "biprompt", agreement, ious)

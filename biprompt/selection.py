"""BiPrompt selection: which of SAM's candidates the experts (today: the referring expression's
text mask) agree with.

Rules (the paper states none of these; they are ours):
- biprompt: each candidate's vote is its IoU with each expert mask that is not empty, averaged
  over those experts; the highest wins; ties (equal vote) go to the higher predicted IoU, then to
  the lower index. If there is no expert, every expert mask is empty, or the best vote is below
  `agreement_threshold`, the point is trusted over the experts: SAM's top candidate is returned
  and `strategy` says why (`fallback_*`). With one expert this is the paper's rule.
- point: SAM's top candidate (highest predicted IoU).
- an expert's name (today: text): that expert's own mask is the answer; `selected` still names
  the candidate that agrees best with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from biprompt.config import DEFAULT_AGREEMENT_THRESHOLD

MODES = ("biprompt", "point", "text")
EXPERT_MODES = ("text",)  # modes that answer with one expert's own mask


@dataclass(frozen=True)
class Selection:
    selected: int
    strategy: str  # biprompt | point | text | fallback_no_text | fallback_empty_text | fallback_low_agreement
    agreement: float | None  # the chosen candidate's vote (mean IoU over the voting experts)
    ious: Mapping[str, np.ndarray] = field(default_factory=dict)  # expert -> (K,) IoU per candidate

    @property
    def text_ious(self) -> np.ndarray | None:
        """(K,) IoU of each candidate with the text mask (None without one)."""
        return self.ious.get("text")


def mask_ious(candidates: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IoU of each of K HxW bool candidates with one HxW bool mask (0 where both are empty)."""
    c = candidates.reshape(candidates.shape[0], -1)
    m = mask.reshape(1, -1)
    inter = np.logical_and(c, m).sum(axis=1, dtype=np.int64)
    union = np.logical_or(c, m).sum(axis=1, dtype=np.int64)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _best(votes: np.ndarray, scores: np.ndarray) -> int:
    # lexsort: last key is primary; -index makes the lower index win a full tie
    order = np.lexsort((-np.arange(len(votes)), scores, votes))
    return int(order[-1])


def _as_experts(experts: Mapping[str, np.ndarray] | np.ndarray | None) -> dict[str, np.ndarray]:
    if experts is None:
        return {}
    if isinstance(experts, np.ndarray):  # one mask: the text expert's
        return {"text": experts}
    return {name: m for name, m in experts.items() if m is not None}


def select(
    candidates: np.ndarray,
    scores: np.ndarray,
    experts: Mapping[str, np.ndarray] | np.ndarray | None,
    mode: str = "biprompt",
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
) -> Selection:
    """candidates: KxHxW bool; scores: (K,) SAM's predicted IoUs; experts: {name: HxW bool}
    (a bare HxW mask is the text expert's; None: no expert)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    experts = _as_experts(experts)
    scores = np.asarray(scores, dtype=np.float64)
    k = len(scores)
    top = int(np.argmax(scores)) if k else 0
    if mode in EXPERT_MODES and mode not in experts:
        raise ValueError(f"mode {mode!r} needs a {mode} mask")
    if not experts:
        return Selection(top, "point" if mode == "point" else "fallback_no_text", None)
    ious = {name: (mask_ious(candidates, m) if k else np.zeros(0)) for name, m in experts.items()}
    voters = [mode] if mode in EXPERT_MODES else [n for n, m in experts.items() if m.any()]
    if mode == "point":
        votes = np.mean([ious[n] for n in experts], axis=0)
        return Selection(top, "point", float(votes[top]) if k else None, ious)
    if not voters:
        return Selection(top, "fallback_empty_" + "_".join(sorted(experts)), 0.0, ious)
    votes = np.mean([ious[n] for n in voters], axis=0) if k else np.zeros(0)
    best = _best(votes, scores) if k else 0
    agreement = float(votes[best]) if k else None
    if mode in EXPERT_MODES:
        return Selection(best, mode, agreement, ious)
    if agreement is not None and agreement < agreement_threshold:
        return Selection(top, "fallback_low_agreement", agreement, ious)
    return Selection(best, "biprompt", agreement, ious)

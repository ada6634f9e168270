"""BiPrompt selection: which of SAM's candidates the experts (today: the referring expression's
text mask) agree with.

Rules (the paper states none of these; they are ours):
- biprompt: each candidate's vote is its IoU with each expert mask that is not empty, averaged
  over those experts; the highest wins; ties (equal vote) go to the higher predicted IoU, then to
  the lower index. If there is no expert, every expert mask is empty, or the best vote is below
  `agreement_threshold`, the point is trusted over the experts: SAM's top candidate is returned
  and `strategy` says why (`fallback_*`). With one expert this is the paper's rule.
- point: SAM's top candidate (highest predicted IoU).
- an expert's name (text, reference): that expert's own mask is the answer; `selected` still
  names the candidate that agrees best with it.

How the voting experts combine (`rule`, measured by `biprompt eval shapes --reference`):
- mean: a candidate's vote is its mean IoU over the voting experts, weighted by `weights`
  (per expert, default 1: a profile's `selection.weights`, measured on a tuning set);
- confident: the expert whose best IoU with any candidate is highest (the one that most clearly
  recognises one of SAM's masks) decides alone;
- arbiter: with the two experts its model was fit for (biprompt.arbiter), each expert's own pick,
  and where they differ a learnt model over what tells the two picks apart says which to take
  (the chosen candidate's vote is the highest IoU any voter has with it); with any other set of
  experts it is `confident`.
With one expert every rule is the paper's rule. `expert_agreement` is the lowest IoU between two
voting experts' masks (None with fewer than two): low means the experts saw different objects,
the case for a human.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from biprompt.arbiter import Arbiter
from biprompt.config import DEFAULT_AGREEMENT_THRESHOLD

MODES = ("biprompt", "point", "text", "reference")
EXPERT_MODES = ("text", "reference")  # modes that answer with one expert's own mask
RULES = ("mean", "confident", "arbiter")
DEFAULT_RULE = "mean"


@dataclass(frozen=True)
class Selection:
    selected: int
    strategy: str  # biprompt | point | text | fallback_no_text | fallback_empty_text | fallback_low_agreement
    agreement: float | None  # the chosen candidate's vote (mean IoU over the voting experts)
    ious: Mapping[str, np.ndarray] = field(default_factory=dict)  # expert -> (K,) IoU per candidate
    expert_agreement: float | None = None  # lowest IoU between two voting experts' masks

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


def expert_agreement(experts: Mapping[str, np.ndarray]) -> float | None:
    """The lowest pairwise IoU between the non-empty expert masks (None: fewer than two)."""
    masks = [m for m in experts.values() if m is not None and m.any()]
    if len(masks) < 2:
        return None
    lows = [float(mask_ious(a[None], b)[0]) for i, a in enumerate(masks) for b in masks[i + 1:]]
    return min(lows)


def combine(ious: Mapping[str, np.ndarray], voters: list[str], rule: str = DEFAULT_RULE,
            weights: Mapping[str, float] | None = None) -> np.ndarray:
    """(K,) votes of the candidates from the voting experts' IoUs, by `rule` (`arbiter` chooses
    in `select`; here, with other experts than its own, it is `confident`)."""
    if rule == "mean" or len(voters) == 1:
        w = np.array([float((weights or {}).get(n, 1.0)) for n in voters])
        if w.sum() <= 0:  # only zero-weight experts voted (weights {text: 0}, a text-only
            w = np.ones_like(w)  # request): they are all there is, so they count equally
        return np.tensordot(w / w.sum(), np.array([ious[n] for n in voters]), axes=1)
    if rule in ("confident", "arbiter"):
        # max over candidates per expert; ties go to the first voter (experts keep their order)
        lead = max(voters, key=lambda n: (float(ious[n].max()), -voters.index(n)))
        return np.asarray(ious[lead], dtype=np.float64)
    raise ValueError(f"unknown selection rule {rule!r}; use one of {RULES}")


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
    rule: str = DEFAULT_RULE,
    weights: Mapping[str, float] | None = None,
    arbiter: Arbiter | None = None,
) -> Selection:
    """candidates: KxHxW bool; scores: (K,) SAM's predicted IoUs; experts: {name: HxW bool}
    (a bare HxW mask is the text expert's; None: no expert); rule: mean | confident | arbiter;
    weights: each expert's weight in the mean (default 1); arbiter: the `arbiter` rule's model."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {RULES}")
    if rule == "arbiter" and arbiter is None:
        raise ValueError("the arbiter rule needs an arbiter (a profile's selection.arbiter)")
    experts = _as_experts(experts)
    scores = np.asarray(scores, dtype=np.float64)
    k = len(scores)
    top = int(np.argmax(scores)) if k else 0
    if mode in EXPERT_MODES and mode not in experts:
        raise ValueError(f"mode {mode!r} needs a {mode} mask")
    if not experts:
        return Selection(top, "point" if mode == "point" else "fallback_no_text", None)
    ious = {name: (mask_ious(candidates, m) if k else np.zeros(0)) for name, m in experts.items()}
    between = expert_agreement(experts)
    voters = [mode] if mode in EXPERT_MODES else [n for n, m in experts.items() if m.any()]
    if mode == "point":
        votes = np.mean([ious[n] for n in experts], axis=0)
        return Selection(top, "point", float(votes[top]) if k else None, ious, between)
    if not voters:
        return Selection(top, "fallback_empty_" + "_".join(sorted(experts)), 0.0, ious, between)
    if k and rule == "arbiter" and sorted(voters) == sorted(arbiter.experts):
        areas = candidates.reshape(k, -1).mean(axis=1)
        best, _ = arbiter.choose(ious, scores, areas, between)
        # its vote: the most any voter overlaps it (the arbiter may take the pick of an expert
        # that overlaps it by less than 1% where the other expert supports it)
        votes = np.max([ious[n] for n in voters], axis=0).astype(np.float64)
    else:
        votes = combine(ious, voters, rule, weights) if k else np.zeros(0)
        best = _best(votes, scores) if k else 0
    agreement = float(votes[best]) if k else None
    if mode in EXPERT_MODES:
        return Selection(best, mode, agreement, ious, between)
    if agreement is not None and agreement < agreement_threshold:
        return Selection(top, "fallback_low_agreement", agreement, ious, between)
    return Selection(best, "biprompt", agreement, ious, between)

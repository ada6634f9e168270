"""The join: SAM's candidates and any number of named expert masks -> the answer.

The one place that turns a decoder's output and the experts' masks (today `{"text": mask}`; a
the reference-image expert adds `"reference"`, a key, not a parameter) into a `SegmentResult`. The in-process
pipeline and the Selector deployment both call `join`; nothing else re-implements it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from biprompt.arbiter import Arbiter
from biprompt.config import DEFAULT_AGREEMENT_THRESHOLD
from biprompt.selection import DEFAULT_RULE, EXPERT_MODES, expert_agreement, select
from biprompt.types import PointCandidates, SegmentResult


def join(
    candidates: PointCandidates | None,
    experts: Mapping[str, np.ndarray | None],
    mode: str = "biprompt",
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
    rule: str = DEFAULT_RULE,
    weights: Mapping[str, float] | None = None,
    arbiter: Arbiter | None = None,
) -> SegmentResult:
    """candidates: SAM's K masks and predicted IoUs for the prompt (None: no point or box, so an
    expert mode answers alone); experts: {name: HxW bool mask}, None or absent when that expert
    was not asked."""
    present = {name: m for name, m in experts.items() if m is not None}
    text_mask = present.get("text")
    if candidates is None:
        if mode not in EXPERT_MODES or mode not in present:
            raise ValueError(f"mode {mode!r} without points or a box needs a {mode} mask")
        answer = present[mode]
        return SegmentResult(answer, None, None, text_mask, None, None, mode, None, mode,
                             expert_masks=present, expert_ious={},
                             expert_agreement=expert_agreement(present))
    sel = select(candidates.masks, candidates.scores, present, mode, agreement_threshold, rule,
                 weights, arbiter)
    mask = present[mode] if mode in EXPERT_MODES else candidates.masks[sel.selected]
    logits = None
    if mode not in EXPERT_MODES and candidates.low_res_logits is not None:
        logits = candidates.low_res_logits[sel.selected]
    return SegmentResult(mask, candidates.masks, candidates.scores, text_mask, sel.text_ious,
                         sel.selected, sel.strategy, sel.agreement, mode,
                         expert_masks=present, expert_ious=dict(sel.ious), low_res_logits=logits,
                         expert_agreement=sel.expert_agreement)

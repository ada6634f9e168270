"""Comparing two computations of one model that may round differently: another kernel (the fast
encoder), another batch shape, another thread count. Such results agree within a tolerance, not bit
for bit, and which side of 0 a logit within that tolerance of 0 lands on is the CPU's choice.

So a mask is checked against the reference only where the reference logit is farther than the
tolerance from 0, and what is computed from masks (IoUs, the choice of a candidate) is checked up
to what the pixels that did differ can move it. Bit-exactness is for two runs of one code path.
"""

from __future__ import annotations

import numpy as np

# Below this share of pixels on which the reference is sure, a check is too weak to mean anything.
MIN_SURE = 0.95


def assert_mask_matches_where_sure(mask, ref_logits, tol: float) -> None:
    """`mask` (HxW bool) equals `ref_logits > 0` wherever |ref_logits| > `tol`.

    A computation whose logits are within `tol` of the reference's cannot put such a pixel on the
    other side of 0; nearer to 0 it may go either way. (Upscaling low-res logits is bilinear, a
    convex combination: pixel logits are as close as the low-res ones.)"""
    mask, ref = np.asarray(mask, dtype=bool), np.asarray(ref_logits)
    assert mask.shape == ref.shape, (mask.shape, ref.shape)
    sure = np.abs(ref) > tol
    assert sure.mean() >= MIN_SURE, f"the reference is sure of only {sure.mean():.1%} of pixels"
    wrong = sure & (mask != (ref > 0))
    assert not wrong.any(), f"{wrong.sum()} pixels differ where |reference logit| > {tol}"


def assert_masks_close(a, b, max_flipped: float) -> int:
    """Two HxW bool masks of one prompt computed on different batch shapes: they may differ at
    pixels whose logit rounds across 0, at most a `max_flipped` share of the pixels. Returns the
    number of differing pixels."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    assert a.shape == b.shape, (a.shape, b.shape)
    flipped = int((a != b).sum())
    assert flipped <= max_flipped * a.size, f"{flipped} of {a.size} pixels differ"
    return flipped


def iou_drift(flipped: int, union: int) -> float:
    """The most an IoU whose union has `union` pixels can move when `flipped` pixels of its two
    masks change: intersection and union each move by at most `flipped`."""
    return 2 * flipped / max(1, union - flipped)


def assert_same_choice(selected: int, ref_ious, drift) -> None:
    """`selected`, picked as the best of IoUs each within `drift[i]` of `ref_ious[i]`, is a best
    reference candidate up to those drifts: exactly the reference's choice when nothing drifts,
    either side of a near-tie when something does."""
    ref_ious, drift = np.asarray(ref_ious, dtype=float), np.asarray(drift, dtype=float)
    best = int(np.argmax(ref_ious))
    assert ref_ious[selected] >= ref_ious[best] - drift[selected] - drift[best], (
        selected, ref_ious.tolist(), drift.tolist())

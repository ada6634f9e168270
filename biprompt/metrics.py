"""Segmentation scores of ShapesRef (spec: shapes-ref.md, "Scoring"). numpy only.

Masks are bool arrays of equal shape (integer 0/1 arrays are accepted; float masks are refused:
threshold them first). A pair where both masks are empty scores IoU = Dice = 1.0 (nothing to find,
nothing found); with any empty-but-not-both pair the score is 0.0.

- mIoU: mean over samples of IoU = |P & G| / |P | G|;
- cIoU: sum over samples of |P & G| / sum of |P | G| (large objects weigh more); 1.0 when every
  union is empty;
- mDice: mean over samples of Dice = 2 |P & G| / (|P| + |G|).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        return m
    if np.issubdtype(m.dtype, np.integer):
        if m.size and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"{name}: integer mask with values outside {{0, 1}}")
        return m.astype(bool)
    raise TypeError(f"{name}: expected a bool mask, got dtype {m.dtype} (threshold it first)")


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(|P & G|, |P | G|, |P|, |G|) of two same-shape masks."""
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: pred {p.shape} vs gt {g.shape}")
    inter = int(np.count_nonzero(p & g))
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    return inter, n_p + n_g - inter, n_p, n_g


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape masks; 1.0 when both are empty."""
    inter, union, _, _ = _counts(a, b)
    return 1.0 if union == 0 else inter / union


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A & B| / (|A| + |B|) of two same-shape masks; 1.0 when both are empty."""
    inter, _, n_a, n_b = _counts(a, b)
    return 1.0 if n_a + n_b == 0 else 2 * inter / (n_a + n_b)


@dataclass
class Scores:
    """Accumulates (pred, gt) pairs; read `miou`, `ciou`, `mdice` or `summary()` at any time.

    Keep one instance per method (and one more per subset, e.g. ambiguous samples).
    """

    ious: list[float] = field(default_factory=list)
    dices: list[float] = field(default_factory=list)
    inter_sum: int = 0  # px
    union_sum: int = 0  # px

    def add(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Score one pair; returns its IoU."""
        inter, union, n_p, n_g = _counts(pred, gt)
        value = 1.0 if union == 0 else inter / union
        self.ious.append(value)
        self.dices.append(1.0 if n_p + n_g == 0 else 2 * inter / (n_p + n_g))
        self.inter_sum += inter
        self.union_sum += union
        return value

    def extend(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Scores:
        for pred, gt in pairs:
            self.add(pred, gt)
        return self

    @property
    def count(self) -> int:
        return len(self.ious)

    @property
    def miou(self) -> float:
        """Mean per-sample IoU; NaN when no pair was added."""
        return float(np.mean(self.ious)) if self.ious else float("nan")

    @property
    def ciou(self) -> float:
        """Sum of intersections / sum of unions; NaN when no pair was added."""
        if not self.ious:
            return float("nan")
        return 1.0 if self.union_sum == 0 else self.inter_sum / self.union_sum

    @property
    def mdice(self) -> float:
        """Mean per-sample Dice; NaN when no pair was added."""
        return float(np.mean(self.dices)) if self.dices else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {"n": self.count, "mIoU": self.miou, "cIoU": self.ciou, "mDice": self.mdice}


def score_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | int]:
    """{"n", "mIoU", "cIoU", "mDice"} over (pred, gt) mask pairs."""
    return Scores().extend(pairs).summary()

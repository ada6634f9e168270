"""biprompt.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from biprompt.metrics import Scores, dice, iou, score_pairs


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """Bool mask with the given (row0, row1, col0, col1) half-open boxes set."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


# Pair A: 2x2 square inside a 2x3 rectangle -> inter 4, union 6, |P| 4, |G| 6.
A_PRED = _mask((4, 4), (0, 2, 0, 2))
A_GT = _mask((4, 4), (0, 2, 0, 3))
# Pair B: two disjoint single pixels -> inter 0, union 2.
B_PRED = _mask((4, 4), (3, 4, 3, 4))
B_GT = _mask((4, 4), (0, 1, 0, 1))
# Pair C: both empty -> counts as a perfect 1.0, adds nothing to the cIoU sums.
C_EMPTY = np.zeros((4, 4), dtype=bool)


def test_iou_and_dice_hand_values() -> None:
    assert iou(A_PRED, A_GT) == pytest.approx(4 / 6)
    assert dice(A_PRED, A_GT) == pytest.approx(2 * 4 / (4 + 6))
    assert iou(B_PRED, B_GT) == 0.0
    assert dice(B_PRED, B_GT) == 0.0
    assert iou(A_GT, A_GT) == 1.0 and dice(A_GT, A_GT) == 1.0


def test_symmetric() -> None:
    assert iou(A_PRED, A_GT) == iou(A_GT, A_PRED)
    assert dice(A_PRED, A_GT) == dice(A_GT, A_PRED)


def test_empty_cases() -> None:
    assert iou(C_EMPTY, C_EMPTY) == 1.0
    assert dice(C_EMPTY, C_EMPTY) == 1.0
    assert iou(C_EMPTY, A_GT) == 0.0
    assert dice(A_GT, C_EMPTY) == 0.0


def test_scores_aggregate_hand_values() -> None:
    s = Scores()
    assert s.add(A_PRED, A_GT) == pytest.approx(2 / 3)
    s.add(B_PRED, B_GT)
    s.add(C_EMPTY, C_EMPTY)
    assert s.count == 3
    assert s.miou == pytest.approx((2 / 3 + 0 + 1) / 3)  # 5/9
    assert s.ciou == pytest.approx((4 + 0 + 0) / (6 + 2 + 0))  # 0.5: not the mean
    assert s.mdice == pytest.approx((0.8 + 0 + 1) / 3)  # 0.6
    assert (s.inter_sum, s.union_sum) == (4, 8)


def test_ciou_weights_large_masks() -> None:
    big_gt = _mask((20, 20), (0, 20, 0, 20))  # 400 px, predicted fully
    tiny_pred, tiny_gt = _mask((20, 20), (0, 1, 0, 1)), _mask((20, 20), (5, 6, 5, 6))
    s = Scores().extend([(big_gt, big_gt), (tiny_pred, tiny_gt)])
    assert s.miou == pytest.approx(0.5)
    assert s.ciou == pytest.approx(400 / 402)


def test_score_pairs_matches_accumulator() -> None:
    pairs = [(A_PRED, A_GT), (B_PRED, B_GT), (C_EMPTY, C_EMPTY)]
    out = score_pairs(pairs)
    assert out["n"] == 3
    assert out["mIoU"] == pytest.approx(5 / 9)
    assert out["cIoU"] == pytest.approx(0.5)
    assert out["mDice"] == pytest.approx(0.6)


def test_no_pairs_is_nan_and_all_empty_ciou_is_one() -> None:
    s = Scores()
    assert math.isnan(s.miou) and math.isnan(s.ciou) and math.isnan(s.mdice)
    s.add(C_EMPTY, C_EMPTY)
    assert s.ciou == 1.0 and s.miou == 1.0


def test_integer_01_masks_accepted() -> None:
    assert iou(A_PRED.astype(np.uint8), A_GT.astype(np.int64)) == pytest.approx(4 / 6)


def test_bad_inputs_refused() -> None:
    with pytest.raises(ValueError):
        iou(A_PRED, np.zeros((4, 5), dtype=bool))
    with pytest.raises(TypeError):
        dice(A_PRED.astype(np.float32), A_GT)
    with pytest.raises(ValueError):
        iou(A_PRED.astype(np.uint8) * 2, A_GT)

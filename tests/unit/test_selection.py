from __future__ import annotations

import numpy as np
import pytest

from biprompt.selection import mask_ious, select
from tests.support.parity import assert_masks_close, assert_same_choice, iou_drift

# A prompt decoded in a batch runs on other tensor shapes than alone: the same arithmetic, other
# rounding (the CPU's kernels decide). Its masks may then differ where a logit rounds across 0: at
# most this share of their pixels (measured on a 2-core Xeon: none).
MAX_FLIPPED = 1e-3


def masks_from_boxes(boxes, shape=(20, 20)):
    out = np.zeros((len(boxes), *shape), dtype=bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = True
    return out


# part / object / whole: nested squares
CANDS = masks_from_boxes([(8, 12, 8, 12), (5, 15, 5, 15), (0, 20, 0, 20)])
SCORES = np.array([0.9, 0.5, 0.3])


def test_picks_the_candidate_the_text_agrees_with():
    text = masks_from_boxes([(5, 15, 4, 15)])[0]
    sel = select(CANDS, SCORES, text)
    assert sel.selected == 1 and sel.strategy == "biprompt"
    assert sel.agreement == pytest.approx(100 / 110)
    np.testing.assert_allclose(sel.text_ious, mask_ious(CANDS, text))


def test_tie_goes_to_higher_predicted_iou_then_lower_index():
    cands = masks_from_boxes([(0, 10, 0, 10), (0, 10, 0, 10), (10, 20, 10, 20)])
    text = masks_from_boxes([(0, 10, 0, 10)])[0]
    assert select(cands, np.array([0.2, 0.7, 0.9]), text).selected == 1
    assert select(cands, np.array([0.7, 0.7, 0.9]), text).selected == 0


def test_empty_text_mask_falls_back_to_top_score():
    sel = select(CANDS, SCORES, np.zeros((20, 20), dtype=bool))
    assert (sel.selected, sel.strategy, sel.agreement) == (0, "fallback_empty_text", 0.0)


def test_low_agreement_falls_back_and_threshold_is_configurable():
    text = masks_from_boxes([(0, 2, 0, 20)])[0]  # a strip that only the whole mask touches
    best_iou = mask_ious(CANDS, text).max()
    sel = select(CANDS, SCORES, text, agreement_threshold=best_iou + 0.01)
    assert (sel.selected, sel.strategy) == (0, "fallback_low_agreement")
    assert sel.agreement == pytest.approx(best_iou)
    sel = select(CANDS, SCORES, text, agreement_threshold=0.0)
    assert (sel.selected, sel.strategy) == (2, "biprompt")


def test_no_text_and_modes():
    assert select(CANDS, SCORES, None).strategy == "fallback_no_text"
    text = masks_from_boxes([(0, 20, 0, 20)])[0]
    assert select(CANDS, SCORES, text, mode="point").selected == 0
    sel = select(CANDS, SCORES, text, mode="text")
    assert (sel.selected, sel.strategy) == (2, "text")
    with pytest.raises(ValueError):
        select(CANDS, SCORES, None, mode="text")
    with pytest.raises(ValueError):
        select(CANDS, SCORES, text, mode="nope")


def test_multi_instance_prompts_on_one_image(tiny_pipeline, rgb_image):
    """One encoder pass for many instances; each result is what a single prompt gives, up to
    the rounding of a batched decoder call (MAX_FLIPPED pixels, IoUs moved only by those)."""
    calls = []
    hook = tiny_pipeline.encoder.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        emb = tiny_pipeline.embed(rgb_image)
        prompts = [dict(points=[[30 + 60 * i, 40 + 30 * i]], text=t)
                   for i, t in enumerate(["the red circle", "the blue square", "the red circle"])]
        batch = tiny_pipeline.segment_batch(emb, prompts)
    finally:
        hook.remove()
    assert len(calls) == 1
    for p, r in zip(prompts, batch, strict=True):
        single = tiny_pipeline.segment(emb, p["points"], text=p["text"])
        np.testing.assert_allclose(r.candidate_scores, single.candidate_scores, atol=1e-5)
        text_flips = assert_masks_close(r.text_mask, single.text_mask, MAX_FLIPPED)
        drift = np.array([
            iou_drift(assert_masks_close(ours, alone, MAX_FLIPPED) + text_flips,
                      np.logical_or(alone, single.text_mask).sum())
            for ours, alone in zip(r.candidates, single.candidates, strict=True)])
        assert (np.abs(r.text_ious - single.text_ious) <= drift + 1e-12).all()
        assert_same_choice(r.selected, single.text_ious, drift)
        assert r.strategy == single.strategy  # agreements ~0.35, the profile's threshold 0.1


def test_rules_combine_several_experts():
    """mean: the average IoU over the experts; confident: the expert whose best IoU with a
    candidate is highest decides alone. One expert: both are the paper's rule."""
    text = masks_from_boxes([(0, 20, 0, 14)])[0]  # the whole, loosely (IoU 0.7 with it)
    reference = masks_from_boxes([(3, 13, 5, 15)])[0]  # the object, shifted (IoU 0.67)
    experts = {"text": text, "reference": reference}
    ious = {k: mask_ious(CANDS, m) for k, m in experts.items()}
    mean = select(CANDS, SCORES, experts, rule="mean")
    votes = (ious["text"] + ious["reference"]) / 2
    assert mean.selected == int(np.argmax(votes)) and mean.agreement == pytest.approx(votes.max())
    confident = select(CANDS, SCORES, experts, rule="confident")
    assert confident.selected == 2 and confident.agreement == pytest.approx(ious["text"][2])
    assert mean.selected == 1  # the text's 0.31 on the object tips the mean: the rules differ
    for rule in ("mean", "confident"):
        assert select(CANDS, SCORES, {"reference": reference}, rule=rule).selected == 1
    with pytest.raises(ValueError, match="rule"):
        select(CANDS, SCORES, experts, rule="vote")


def test_expert_agreement_is_the_lowest_pairwise_iou():
    a = masks_from_boxes([(0, 10, 0, 10)])[0]
    b = masks_from_boxes([(0, 10, 0, 5)])[0]
    c = masks_from_boxes([(10, 20, 10, 20)])[0]
    assert select(CANDS, SCORES, {"text": a}).expert_agreement is None
    assert select(CANDS, SCORES, {"text": a, "reference": b}).expert_agreement == pytest.approx(0.5)
    three = select(CANDS, SCORES, {"text": a, "reference": b, "other": c})
    assert three.expert_agreement == 0.0
    # an empty expert mask abstains from the vote and from the agreement
    empty = np.zeros_like(a)
    assert select(CANDS, SCORES, {"text": a, "reference": empty}).expert_agreement is None


def test_reference_mode_answers_with_the_reference_mask():
    ref = masks_from_boxes([(5, 15, 5, 14)])[0]
    sel = select(CANDS, SCORES, {"text": CANDS[0], "reference": ref}, mode="reference")
    assert (sel.strategy, sel.selected) == ("reference", 1)
    with pytest.raises(ValueError, match="reference mask"):
        select(CANDS, SCORES, {"text": CANDS[0]}, mode="reference")


def test_the_mean_weighs_each_expert():
    text = masks_from_boxes([(0, 20, 0, 14)])[0]
    reference = masks_from_boxes([(3, 13, 5, 15)])[0]
    experts = {"text": text, "reference": reference}
    ious = {k: mask_ious(CANDS, m) for k, m in experts.items()}
    assert select(CANDS, SCORES, experts, weights={"reference": 1.0}).selected == 1
    heavy = select(CANDS, SCORES, experts, weights={"text": 3.0})
    votes = (3 * ious["text"] + ious["reference"]) / 4
    assert heavy.selected == 2 and heavy.agreement == pytest.approx(votes[2])


def test_an_expert_weighted_zero_still_decides_when_it_votes_alone():
    """weights {text: 0} lets the reference outvote the text; a request with only a text mask is
    still decided by it (no NaN votes, no silent pick of candidate 0)."""
    text = masks_from_boxes([(0, 20, 0, 19)])[0]
    sel = select(CANDS, SCORES, {"text": text}, weights={"text": 0.0, "reference": 1.0})
    assert sel.selected == 2 and np.isfinite(sel.agreement)
    assert sel.agreement == pytest.approx(mask_ious(CANDS, text)[2])
    reference = masks_from_boxes([(5, 15, 5, 15)])[0]
    both = select(CANDS, SCORES, {"text": text, "reference": reference},
                  weights={"text": 0.0, "reference": 1.0})
    assert both.selected == 1

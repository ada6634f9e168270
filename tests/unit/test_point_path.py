"""The point path is SamPredictor's arithmetic: same masks, same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from biprompt.factory import LoadedSam
from biprompt.models.sam import build_sam, get_sam_spec
from biprompt.pipeline import BiPromptPipeline
from biprompt.prompts import make_prompt


@pytest.fixture(scope="module")
def sam_and_pipe():
    torch.manual_seed(3)
    spec = get_sam_spec("tiny")
    sam = build_sam(spec)
    # The reference encoder forward: this module checks SamPredictor's arithmetic bit for bit
    # (the fast path's own parity is tests/unit/test_fast_attention.py).
    pipe = BiPromptPipeline.from_models(LoadedSam(sam, spec, "sam-tiny:test"), fast_encoder=False)
    return sam, pipe


@pytest.mark.parametrize(
    "shape, points, labels, box",
    [
        ((240, 320), [[100.0, 50.0]], [1], None),
        ((256, 256), [[10.5, 200.25], [128, 128]], [1, 0], None),
        ((300, 180), [[90, 150]], [1], [20, 30, 170, 290]),
        ((64, 97), None, None, [3, 4, 60, 50]),
    ],
)
def test_matches_sam_predictor(sam_and_pipe, shape, points, labels, box):
    sam, pipe = sam_and_pipe
    img = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(img)
    ref_masks, ref_scores, ref_low = predictor.predict(
        point_coords=None if points is None else np.array(points, dtype=float),
        point_labels=None if labels is None else np.array(labels),
        box=None if box is None else np.array(box, dtype=float),
        multimask_output=True,
    )
    emb = pipe.embed(img)
    assert torch.equal(emb.embedding, predictor.features)
    res = pipe.segment(emb, points, labels, box=box, mode="point", multimask=True)
    assert res.candidates.shape == (3, *shape)
    np.testing.assert_array_equal(res.candidates, ref_masks)
    np.testing.assert_allclose(res.candidate_scores, ref_scores, rtol=0, atol=1e-5)
    assert res.selected == int(np.argmax(ref_scores))
    np.testing.assert_array_equal(res.mask, ref_masks[res.selected])


def test_refinement_matches_sam_predictor_with_mask_input(sam_and_pipe):
    """A refinement click (previous low-res logits as mask_input, single-mask output) is
    SamPredictor's arithmetic too."""
    sam, pipe = sam_and_pipe
    img = np.random.default_rng(4).integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(img)
    _, scores, low = predictor.predict(point_coords=np.array([[100.0, 50.0]]),
                                       point_labels=np.array([1]), multimask_output=True)
    prev = low[int(np.argmax(scores))]
    pts, labs = np.array([[100.0, 50.0], [200.0, 180.0]]), np.array([1, 0])
    ref_masks, ref_scores, ref_low = predictor.predict(
        point_coords=pts, point_labels=labs, mask_input=prev[None], multimask_output=False)
    emb = pipe.embed(img)
    first = pipe.segment(emb, [[100.0, 50.0]], mode="point")
    np.testing.assert_array_equal(first.low_res_logits, prev)
    res = pipe.segment(emb, pts, labs, mode="point", mask_input=first.low_res_logits)
    assert res.candidates.shape == (1, 240, 320)  # point mode refines with the single mask
    np.testing.assert_array_equal(res.candidates, ref_masks)
    np.testing.assert_allclose(res.candidate_scores, ref_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(res.low_res_logits, ref_low[0], rtol=0, atol=1e-4)


def test_batched_decode_equals_single(sam_and_pipe):
    _, pipe = sam_and_pipe
    img = np.random.default_rng(2).integers(0, 256, size=(200, 150, 3), dtype=np.uint8)
    emb = pipe.embed(img)
    prompts = [make_prompt(emb.original_size, [[x, y]], mode="point")
               for x, y in [(10, 10), (75, 100), (140, 190), (5, 150)]]
    batched = pipe.decode_points(emb, prompts)
    for p, b in zip(prompts, batched, strict=False):
        (single,) = pipe.decode_points(emb, [p])
        np.testing.assert_allclose(b.scores, single.scores, atol=1e-5)
        np.testing.assert_allclose(b.low_res_logits, single.low_res_logits, atol=1e-4)


def test_embed_batch_matches_single(sam_and_pipe):
    _, pipe = sam_and_pipe
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(100, 80, 3), (64, 128, 3)]]
    batch = pipe.embed_batch(imgs)
    for img, e in zip(imgs, batch, strict=False):
        single = pipe.embed(img)
        assert e.input_size == single.input_size and e.original_size == img.shape[:2]
        torch.testing.assert_close(e.embedding, single.embedding, atol=1e-4, rtol=1e-4)

"""Refinement clicks in the core: SAM's mask_input and single-mask output, the clicker, the
logits' cache format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from biprompt.cache import CacheFormatError, pack_logits, unpack_logits
from biprompt.clicks import interior_point, iou, next_click
from biprompt.errors import InvalidPromptError
from biprompt.prompts import make_prompt, refinement_multimask


def _scene():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 60, size=(96, 128, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)
    return img


def test_a_refinement_click_reuses_the_embedding_and_takes_the_logits(tiny_pipeline):
    emb = tiny_pipeline.embed(_scene())
    first = tiny_pipeline.segment(emb, [[50, 40]], mode="point")
    L = tiny_pipeline.decoder.logits_size
    assert first.candidates.shape[0] == 3 and first.low_res_logits.shape == (L, L)
    np.testing.assert_array_equal(
        first.low_res_logits,
        tiny_pipeline.decode_points(emb, [make_prompt(emb.original_size, [[50, 40]])])[0]
        .low_res_logits[first.selected])
    second = tiny_pipeline.segment(emb, [[50, 40], [10, 10]], [1, 0], mode="point",
                                   mask_input=first.low_res_logits)
    # point mode refines with SAM's single mask; the logits change the answer's input
    assert second.candidates.shape[0] == 1 and second.low_res_logits.shape == (L, L)
    without = tiny_pipeline.segment(emb, [[50, 40], [10, 10]], [1, 0], mode="point")
    assert not np.array_equal(second.low_res_logits, without.low_res_logits)
    three = tiny_pipeline.segment(emb, [[50, 40], [10, 10]], [1, 0], mode="point",
                                  mask_input=first.low_res_logits, multimask=True)
    assert three.candidates.shape[0] == 3


def test_mask_input_of_the_wrong_size_is_refused(tiny_pipeline):
    emb = tiny_pipeline.embed(_scene())
    L = tiny_pipeline.decoder.logits_size
    with pytest.raises(InvalidPromptError, match=f"{L}x{L}"):
        tiny_pipeline.segment(emb, [[50, 40]], mode="point", mask_input=np.zeros((L + 4, L + 4)))
    with pytest.raises(InvalidPromptError, match="square"):
        make_prompt((96, 128), [[5, 5]], mask_input=np.zeros((4, 8)))
    with pytest.raises(InvalidPromptError, match="NaN"):
        make_prompt((96, 128), [[5, 5]], mask_input=np.full((8, 8), np.nan))


def test_multimask_policy():
    assert refinement_multimask("point", 1, False) is True  # a first click is ambiguous
    assert refinement_multimask("point", 2, False) is False
    assert refinement_multimask("point", 1, True) is False
    assert make_prompt((9, 9), [[1, 1]]).multimask is True
    assert make_prompt((9, 9), [[1, 1], [2, 2]], multimask=True).multimask is True


def test_the_clicker_goes_to_the_largest_error_interior():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = np.zeros_like(gt)
    c = next_click(pred, gt)
    assert c.positive and 13 <= c.x <= 16 and 13 <= c.y <= 16  # the square's centre
    pred = gt.copy()
    pred[30:38, 30:38] = True  # a false positive only
    c = next_click(pred, gt)
    assert not c.positive and 32 <= c.x <= 35 and 32 <= c.y <= 35
    assert next_click(gt, gt) is None
    # a region touching the border: its interior point keeps away from the border too
    edge = np.zeros((20, 20), bool)
    edge[:, :6] = True
    assert interior_point(edge)[0] in (2, 3)
    assert iou(gt, gt) == 1.0 and iou(gt, ~gt) == 0.0


def test_logits_round_trip_through_the_cache_format():
    logits = np.linspace(-8, 8, 64 * 64, dtype=np.float32).reshape(64, 64)
    out, owner = unpack_logits(pack_logits(logits, "sam-x", "img1"), "sam-x")
    assert owner == "img1" and out.dtype == np.float32
    np.testing.assert_allclose(out, logits, atol=8 * 2**-10)  # float16 rounding at |x| <= 8
    with pytest.raises(CacheFormatError):
        unpack_logits(pack_logits(logits, "sam-x", "img1"), "sam-y")


def test_the_refinement_stage_trains_only_what_a_first_click_never_uses(tmp_path):
    """The frozen stage (no --full) changes the single-mask path and keeps first clicks bit for
    bit (main raises if they moved); --full trains the decoder too."""
    import shutil

    import torch

    from biprompt.train import refine

    shutil.copy("models/demo/sam_demo.pth", tmp_path / "sam_demo.pth")
    before = torch.load(tmp_path / "sam_demo.pth")
    small = ["--model", str(tmp_path), "--steps", "2", "--images", "1", "--prompts", "2",
             "--max-clicks", "2", "--warmup", "1", "--lr", "1e-2"]
    refine.main(small)
    after = torch.load(tmp_path / "sam_demo.pth")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("prompt_encoder.mask_downscaling",
                                         "prompt_encoder.point_embeddings.0",
                                         "mask_decoder.output_hypernetworks_mlps.0",
                                         "mask_decoder.iou_prediction_head.layers.2"))
                           for k in changed), sorted(changed)
    refine.main([*small, "--full"])
    full = torch.load(tmp_path / "sam_demo.pth")
    assert not torch.equal(after["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"],
                           full["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"])
    # each pass is recorded, in order, with its own arguments
    passes = json.loads((tmp_path / "refine_summary.json").read_text())
    assert [p["args"]["full"] for p in passes] == [False, True]
    assert all(p["refine_minutes"] >= 0 and p["args"]["steps"] == 2 for p in passes)


def test_noc_counts_clicks_to_a_threshold_and_max_clicks_when_never():
    from biprompt.evaluate_clicks import noc

    curves = np.array([[0.5, 0.86, 0.91, 0.95], [0.92, 0.8, 0.8, 0.8], [0.1, 0.2, 0.3, 0.4]])
    assert noc(curves, 0.90).tolist() == [3, 1, 4]
    assert noc(curves, 0.85).tolist() == [2, 1, 4]


def test_the_clicks_protocol_reports_every_method_and_the_oracle_bounds_the_first_click(
        tiny_pipeline):
    from biprompt.evaluate_clicks import METHODS, ORACLE, evaluate_clicks, format_table

    result = evaluate_clicks(tiny_pipeline, n=4, seed=3, height=128, width=128, max_clicks=5)
    assert set(result["methods"]) == set(METHODS)
    first = {m: r["all"]["miou_per_click"][0] for m, r in result["methods"].items()}
    # click 1 is a choice among the same three candidates; the oracle takes the best of them
    assert all(first[ORACLE] >= v - 1e-9 for v in first.values()), first
    for r in result["methods"].values():
        assert len(r["all"]["miou_per_click"]) == 5
        assert 1 <= r["all"]["noc@90"] <= 5 and 0 <= r["all"]["never@90"] <= 1
    assert ORACLE in format_table(result)


def test_one_decoder_pass_gives_both_outputs_with_the_gradients_of_two():
    """The refinement stage decodes each click once (decode_all) for the single mask and the
    three candidates: the same values as decode_pairs' two calls, bit for bit (the same code
    path), and the same gradients up to float32 summation order (stated tolerance 1e-5)."""
    import torch

    from biprompt.models.decoding import decode_all, decode_pairs
    from biprompt.models.sam import SAM_VARIANTS, build_sam

    torch.manual_seed(0)
    sam = build_sam(SAM_VARIANTS["demo"])
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    emb = torch.randn(3, 64, 16, 16)  # the demo SAM's prompt_dim x its 16x16 grid
    coords = torch.rand(3, 2, 2) * 256
    labels = torch.tensor([[1, 0], [1, 1], [1, 0]])

    def grads(two_passes: bool):
        dec.zero_grad(set_to_none=True)
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        if two_passes:
            one, one_iou = decode_pairs(dec, emb, pe.get_dense_pe(), sparse, dense, False)
            three, three_iou = decode_pairs(dec, emb, pe.get_dense_pe(), sparse, dense, True)
        else:
            masks, ious = decode_all(dec, emb, pe.get_dense_pe(), sparse, dense)
            one, one_iou, three, three_iou = masks[:, :1], ious[:, :1], masks[:, 1:], ious[:, 1:]
        loss = one.sigmoid().mean() + three.amax(1).mean() + one_iou.sum() + three_iou.pow(2).sum()
        loss.backward()
        return (one.detach(), three.detach()), {n: p.grad.clone() for n, p in dec.named_parameters()
                                                if p.grad is not None}

    (one2, three2), g2 = grads(True)
    (one1, three1), g1 = grads(False)
    assert torch.equal(one1, one2) and torch.equal(three1, three2)
    assert set(g1) == set(g2) and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-6, msg=name)

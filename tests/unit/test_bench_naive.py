"""The benchmark suite's pieces: the checkpoint writer (run here at tiny shapes) and the naive
BiPrompt baseline, which must compute what BiPromptPipeline computes, the slow way.

The two compute the same things with other code, and the pipeline's fast encoder with other
kernels: masks are held to the reference logits wherever those are farther than ``ATOL`` from 0,
scores to ``ATOL``, and IoUs and the chosen candidate up to what the pixels that do differ can move
them (tests/support/parity.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks.checkpoints import write_vitb_checkpoints
from benchmarks.naive import STAGES, NaiveBiPrompt
from biprompt.data.shapes_ref import make_samples
from biprompt.errors import ModelConfigError
from biprompt.factory import TINY_BEIT3
from biprompt.models.checkpoint import read_state_dict, sub_state
from biprompt.models.evf_loading import read_hf_weights
from biprompt.models.fast_attention import fast_attention_enabled
from biprompt.pipeline import BiPromptPipeline
from tests.support.evf_reference import evf_reference_logits
from tests.support.parity import assert_mask_matches_where_sure, assert_same_choice, iou_drift

REPO = Path(__file__).resolve().parents[2]
DEMO_PROFILE = REPO / "configs/models/demo.yaml"
# Max-abs difference allowed on logits and predicted IoUs between the pipeline (either encoder)
# and the naive reference (measured: 1e-6 at most).
ATOL = 1e-4
TINY_PROMPTS = [((150, 100), "the red circle"), ((20, 200), "the small blue square"),
                ((300, 10), "the leftmost green triangle")]


def write_tiny(root: Path, seed: int = 3) -> dict:
    return write_vitb_checkpoints(root, seed, sam_variant="tiny", beit3_scale=TINY_BEIT3)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bench-ckpt"))


def naive_and_pipelines(profile) -> tuple[NaiveBiPrompt, dict[bool, BiPromptPipeline]]:
    """The naive baseline and a pipeline per encoder path (fast_encoder False / True)."""
    return NaiveBiPrompt.from_profile(profile), {
        fast: BiPromptPipeline.from_config(profile, fast_encoder=fast) for fast in (False, True)}


@pytest.fixture(scope="module")
def tiny_models(tiny_ckpt):
    return naive_and_pipelines(tiny_ckpt["profile"])


@pytest.fixture(scope="module")
def demo_models():
    return naive_and_pipelines(DEMO_PROFILE)


# --- the writer ---------------------------------------------------------------------------------


def test_written_checkpoints_load_through_the_pipeline_with_one_shared_encoder(tiny_ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        pipe = BiPromptPipeline.from_config(tiny_ckpt["profile"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert pipe.name == "tiny-shaped-random" and pipe.spec.name == "tiny"
    assert pipe.agreement_threshold == 0.1
    assert pipe.text.model_id == f"evf:{tiny_ckpt['evf'].name}"

    sam = read_state_dict(tiny_ckpt["sam"])
    evf = read_hf_weights(tiny_ckpt["evf"])
    ours, theirs = sub_state(sam, "image_encoder."), sub_state(evf, "visual_model.image_encoder.")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # EVF's prompt encoder and decoder are its own (fine-tuned in the real model)
    key = "mask_decoder.iou_token.weight"
    assert not torch.equal(sam[key], evf[f"visual_model.{key}"])
    # SAM zero-initialises these; the writer randomises them
    assert 0.05 < sam["image_encoder.pos_embed"].std() < 0.2
    assert 0.05 < sam["image_encoder.blocks.1.attn.rel_pos_h"].std() < 0.2
    profile = yaml.safe_load(tiny_ckpt["profile"].read_text())
    assert Path(profile["sam"]["checkpoint"]).is_absolute()
    assert profile["sam"]["variant"] == "tiny" and profile["device"] == "cpu"


def test_a_second_call_reuses_the_files_and_a_new_seed_rewrites_them(tiny_ckpt, tmp_path):
    files = [tiny_ckpt["sam"], tiny_ckpt["evf"] / "model.safetensors", tiny_ckpt["profile"]]
    before = [f.stat().st_mtime_ns for f in files]
    again = write_tiny(tiny_ckpt["sam"].parent)
    assert again["reused"] and not tiny_ckpt["reused"]
    assert [f.stat().st_mtime_ns for f in files] == before
    assert again["sam_mb"] == tiny_ckpt["sam_mb"] > 0

    other = write_tiny(tmp_path, seed=4)
    assert not other["reused"]
    a, b = read_state_dict(tiny_ckpt["sam"]), read_state_dict(other["sam"])
    assert not torch.equal(a["image_encoder.pos_embed"], b["image_encoder.pos_embed"])
    assert write_tiny(tmp_path, seed=4)["reused"]


# --- the naive baseline ---------------------------------------------------------------------


def assert_same_result(naive: NaiveBiPrompt, image, point, text: str, res) -> dict:
    """Run the naive baseline on (image, point, text) and hold the pipeline's result `res` to it.
    Returns the naive's output."""
    out = naive.segment(image, point, text)
    # the logits behind the naive's masks: SamPredictor's (its image is still set) and EVF-SAM's
    logits, _, _ = naive.predictor.predict(point_coords=np.array([point], dtype=np.float64),
                                           point_labels=np.array([1]), multimask_output=True,
                                           return_logits=True)
    np.testing.assert_array_equal(out["candidates"], logits > 0)  # the same call, thresholded
    text_logits = evf_reference_logits(naive.evf, naive.tokenizer, image, text)
    assert_mask_matches_where_sure(out["text_mask"], text_logits, ATOL)
    assert out["text_mask"].any() and not out["text_mask"].all()

    assert res.candidates.shape == out["candidates"].shape
    for mask, ref in zip(res.candidates, logits, strict=True):
        assert_mask_matches_where_sure(mask, ref, ATOL)
    assert_mask_matches_where_sure(res.text_mask, text_logits, ATOL)
    np.testing.assert_allclose(res.candidate_scores, out["scores"], rtol=0, atol=ATOL)
    text_flips = int((res.text_mask != out["text_mask"]).sum())
    drift = np.array([
        iou_drift(int((ours != theirs).sum()) + text_flips,
                  int(np.logical_or(theirs, out["text_mask"]).sum()))
        for ours, theirs in zip(res.candidates, out["candidates"], strict=True)])
    assert (np.abs(res.text_ious - out["text_ious"]) <= drift + 1e-12).all()
    assert res.strategy == "biprompt"  # no fallback: the two selection rules coincide
    assert_same_choice(res.selected, out["text_ious"], drift)
    return out


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_naive_matches_the_pipeline_on_random_tiny_checkpoints(tiny_models, rgb_image, fast):
    naive, pipes = tiny_models
    for point, text in TINY_PROMPTS:
        res = pipes[fast].segment(rgb_image, [list(point)], text=text)
        assert_same_result(naive, rgb_image, point, text, res)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_naive_matches_the_pipeline_on_the_demo_model(demo_models, fast):
    naive, pipes = demo_models
    overruled = 0  # the text picked another candidate than SAM's top-scored one
    for s in make_samples(5, 5):
        res = pipes[fast].segment(s.image, [list(s.point_index)], text=s.expression)
        out = assert_same_result(naive, s.image, s.point_index, s.expression, res)
        overruled += out["selected"] != int(np.argmax(out["scores"]))
    assert overruled >= 1


def test_naive_runs_two_reference_encoders_and_times_every_stage(demo_models):
    naive, _ = demo_models
    sam_encoder = naive.predictor.model.image_encoder
    evf_encoder = naive.evf.visual_model.image_encoder
    assert sam_encoder is not evf_encoder
    assert not fast_attention_enabled(sam_encoder) and not fast_attention_enabled(evf_encoder)
    s = next(iter(make_samples(1, 9)))
    out = naive.segment(s.image, s.point_index, s.expression)
    t = out["timings_s"]
    assert tuple(t) == STAGES and all(v > 0 for v in t.values())
    assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))
    assert np.array_equal(out["mask"], out["candidates"][out["selected"]])
    assert out["mask"].shape == s.image.shape[:2]


def test_naive_needs_checkpoints():
    with pytest.raises(ModelConfigError, match="checkpoint"):
        NaiveBiPrompt.from_profile(REPO / "configs/models/tiny.yaml")

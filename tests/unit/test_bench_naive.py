"""The benchmark suite's pieces: the checkpoint writer (run here at tiny shapes) and the naive
BiPrompt baseline, which must compute what BiPromptPipeline computes, the slow way."""

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
from biprompt.models.fast_attention import fast_attention_enabled, set_fast_attention
from biprompt.pipeline import BiPromptPipeline

REPO = Path(__file__).resolve().parents[2]
DEMO_PROFILE = REPO / "configs/models/demo.yaml"
# Fast and reference attention round differently: a mask may flip this many pixels at most.
MAX_DIFF_PIXELS = 8
TINY_PROMPTS = [((150, 100), "the red circle"), ((20, 200), "the small blue square"),
                ((300, 10), "the leftmost green triangle")]


def write_tiny(root: Path, seed: int = 3) -> dict:
    return write_vitb_checkpoints(root, seed, sam_variant="tiny", beit3_scale=TINY_BEIT3)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bench-ckpt"))


@pytest.fixture(scope="module")
def tiny_models(tiny_ckpt):
    return (NaiveBiPrompt.from_profile(tiny_ckpt["profile"]),
            BiPromptPipeline.from_config(tiny_ckpt["profile"]))


@pytest.fixture(scope="module")
def demo_models():
    return NaiveBiPrompt.from_profile(DEMO_PROFILE), BiPromptPipeline.from_config(DEMO_PROFILE)


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


def assert_same_result(naive: dict, res) -> None:
    assert naive["candidates"].shape == res.candidates.shape
    for ours, theirs in zip(naive["candidates"], res.candidates, strict=True):
        assert (ours != theirs).sum() <= MAX_DIFF_PIXELS
    assert (naive["text_mask"] != res.text_mask).sum() <= MAX_DIFF_PIXELS
    assert naive["text_mask"].any() and not naive["text_mask"].all()
    assert res.strategy == "biprompt"  # no fallback: the two selection rules coincide
    assert naive["selected"] == res.selected
    np.testing.assert_allclose(naive["text_ious"], res.text_ious, atol=1e-3)
    np.testing.assert_allclose(naive["scores"], res.candidate_scores, atol=1e-4)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_naive_matches_the_pipeline_on_random_tiny_checkpoints(tiny_models, rgb_image, fast):
    naive, pipe = tiny_models
    set_fast_attention(pipe.sam.image_encoder, fast)
    for point, text in TINY_PROMPTS:
        assert_same_result(naive.segment(rgb_image, point, text),
                           pipe.segment(rgb_image, [list(point)], text=text))


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_naive_matches_the_pipeline_on_the_demo_model(demo_models, fast):
    naive, pipe = demo_models
    set_fast_attention(pipe.sam.image_encoder, fast)
    overruled = 0  # the text picked another candidate than SAM's top-scored one
    for s in make_samples(5, 5):
        out = naive.segment(s.image, s.point_index, s.expression)
        assert_same_result(out, pipe.segment(s.image, [list(s.point_index)], text=s.expression))
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

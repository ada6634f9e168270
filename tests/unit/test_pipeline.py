"""The in-process pipeline: one encoder pass feeds both paths; modes; profiles."""

from __future__ import annotations

import numpy as np
import pytest

from biprompt import BiPromptPipeline, ImageEmbedding
from biprompt.errors import InvalidImageError, InvalidPromptError, ModelConfigError


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_one_encoder_pass_serves_point_and_text(tiny_pipeline, rgb_image):
    sam_calls, h1 = count_calls(tiny_pipeline.encoder.encoder)
    text_calls, h2 = count_calls(tiny_pipeline.text.model.mm_extractor.beit3)
    try:
        res = tiny_pipeline.segment(rgb_image, [[150, 100]], text="the red circle")
    finally:
        h1.remove()
        h2.remove()
    assert len(sam_calls) == 1 and len(text_calls) == 1
    assert tiny_pipeline.text.model.visual_model.image_encoder is None  # nothing to call
    assert res.candidates.shape == (3, 240, 320) and res.text_mask.shape == (240, 320)
    assert res.text_ious.shape == (3,) and res.strategy in ("biprompt", "fallback_low_agreement",
                                                           "fallback_empty_text")


def test_result_fields_are_consistent(tiny_pipeline, rgb_image):
    emb = tiny_pipeline.embed(rgb_image)
    assert isinstance(emb, ImageEmbedding) and emb.original_size == (240, 320)
    res = tiny_pipeline.segment(emb, [[150, 100]], text="the red circle")
    np.testing.assert_array_equal(res.mask, res.candidates[res.selected])
    inter = np.logical_and(res.candidates, res.text_mask).sum((1, 2))
    union = np.logical_or(res.candidates, res.text_mask).sum((1, 2))
    np.testing.assert_allclose(res.text_ious, np.where(union > 0, inter / np.maximum(union, 1), 0))
    point = tiny_pipeline.segment(emb, [[150, 100]], mode="point")
    assert point.selected == int(np.argmax(point.candidate_scores)) and point.strategy == "point"
    text = tiny_pipeline.segment(emb, text="the red circle", mode="text")
    assert text.candidates is None and text.strategy == "text"
    np.testing.assert_array_equal(text.mask, res.text_mask)
    no_text = tiny_pipeline.segment(emb, [[150, 100]])
    assert no_text.strategy == "fallback_no_text" and no_text.text_mask is None


def test_embedding_from_another_model_is_refused(tiny_pipeline, rgb_image):
    emb = tiny_pipeline.embed(rgb_image)
    emb.model_id = "sam-vit_h:other"
    with pytest.raises(InvalidImageError, match="embedding was made by"):
        tiny_pipeline.segment(emb, [[1, 1]])


def test_point_only_pipeline_refuses_text(rgb_image):
    from biprompt.factory import load_sam

    pipe = BiPromptPipeline.from_models(load_sam(None, "tiny"))
    assert pipe.model_ids["text"] is None
    assert pipe.segment(rgb_image, [[5, 5]]).strategy == "fallback_no_text"
    with pytest.raises(InvalidPromptError, match="no text model"):
        pipe.segment(rgb_image, [[5, 5]], text="the red circle")


def test_profiles(tmp_path):
    with pytest.raises(ModelConfigError, match="could not read"):
        BiPromptPipeline.from_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sam: {variant: vit_x}\n")
    with pytest.raises(ModelConfigError, match="unknown SAM variant"):
        BiPromptPipeline.from_config(bad)
    with pytest.raises(ModelConfigError, match="unknown dtype"):
        BiPromptPipeline.from_config("configs/models/tiny.yaml", dtype="float8")


@pytest.mark.parametrize("profile", ["sam-vit-h+evf-sam", "sam-vit-b+evf-sam"])
def test_real_profiles_fail_fast_offline(profile, monkeypatch):
    """No network and nothing cached: a clear error naming what to supply, not a hang."""
    from biprompt.errors import WeightsUnavailableError

    monkeypatch.setenv("BIPROMPT_EVF_BASE", "someone/evf-sam-base")
    with pytest.raises(WeightsUnavailableError, match="sam_vit_[hb]_.*pass its path"):
        BiPromptPipeline.from_config(f"configs/models/{profile}.yaml")
    monkeypatch.delenv("BIPROMPT_EVF_BASE")
    if profile == "sam-vit-b+evf-sam":
        with pytest.raises(ModelConfigError, match="BIPROMPT_EVF_BASE.*not set"):
            BiPromptPipeline.from_config(f"configs/models/{profile}.yaml")

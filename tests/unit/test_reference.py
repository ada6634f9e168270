"""The reference-image expert: the VRP checkpoint layout, the engine's annotation paths and
batching, the cacheable features, and the pipeline's reference mode (tiny profile, random
weights: behaviour, not accuracy)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from biprompt.cache import CacheFormatError
from biprompt.data.shapes_ref import make_samples
from biprompt.engines.reference_mask import (
    ReferenceMaskEngine,
    annotation_key,
    check_reference_pairing,
    features_from_bytes,
    features_to_bytes,
)
from biprompt.errors import CheckpointError, InvalidPromptError, ModelConfigError
from biprompt.models.sam import get_sam_spec
from biprompt.models.vrp import ReferenceFeatures, VrpConfig, VrpEncoder, load_vrp, save_vrp
from biprompt.pipeline import BiPromptPipeline

TINY = "configs/models/tiny.yaml"


@pytest.fixture(scope="module")
def pipe():
    return BiPromptPipeline.from_config(TINY)


@pytest.fixture(scope="module")
def samples():
    return make_samples(3, 11)


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def test_checkpoint_round_trip_keeps_every_key(tmp_path):
    spec = get_sam_spec("tiny")
    cfg = VrpConfig(embed_dim=spec.prompt_dim, hidden_dim=32, num_queries=4, num_heads=2,
                    ffn_dim=64, own_decoder=True, sam_spec=spec.to_dict())
    torch.manual_seed(0)
    model = VrpEncoder(cfg)
    out = save_vrp(model, tmp_path / "vrp")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "vrp"
    loaded = load_vrp(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and any(k.startswith("mask_decoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="could not read"):
        load_vrp(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vrp", "embed_dim": 32}))
    with pytest.raises(CheckpointError, match="no weights"):
        load_vrp(tmp_path)
    with pytest.raises(ModelConfigError, match="not 'vrp'"):
        VrpConfig.from_dict({"model_type": "evf", "embed_dim": 32})
    with pytest.raises(ModelConfigError, match="sam_spec"):
        VrpConfig.from_dict({"embed_dim": 32, "own_decoder": True})
    # a checkpoint of another shape fails on the key check, naming the key
    save_vrp(VrpEncoder(VrpConfig(embed_dim=32, hidden_dim=16, num_heads=2)), tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    cfg["hidden_dim"] = 32
    (tmp_path / "x" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_vrp(tmp_path / "x")


def test_pairing_checks_width_and_warns_on_another_sam(caplog):
    spec = get_sam_spec("tiny")
    with pytest.raises(ModelConfigError, match="channel"):
        check_reference_pairing(VrpEncoder(VrpConfig(embed_dim=spec.prompt_dim + 1,
                                                     hidden_dim=16, num_heads=2)), spec, None)
    other = VrpEncoder(VrpConfig(embed_dim=spec.prompt_dim, hidden_dim=16, num_heads=2,
                                 sam_probe="0" * 64, sam_model="another"))
    with caplog.at_level(logging.WARNING):
        check_reference_pairing(other, spec, torch.ones(3))
    assert "trained on another SAM" in caplog.text


def test_features_survive_the_cache_codec(pipe, samples):
    s = samples[0]
    ref = pipe.encode_reference(s.image, mask=s.gt_mask)
    blob = features_to_bytes(ref.features, pipe.reference.model_id)
    back = features_from_bytes(blob, pipe.reference.model_id)
    for name in ("queries", "prototype", "fg"):
        torch.testing.assert_close(getattr(back, name), getattr(ref.features, name),
                                   rtol=1e-3, atol=1e-3)  # stored as float16
    assert torch.equal(back.fg_valid, ref.features.fg_valid)
    emb = pipe.embed(samples[1].image)
    a = pipe.reference.reference_masks([emb], [ref.features])[0]
    b = pipe.reference.reference_masks([emb], [back])[0]
    assert _agree(a, b) >= 0.99
    with pytest.raises(CacheFormatError):
        features_from_bytes(b"not a cache value")
    with pytest.raises(CacheFormatError, match="want"):
        features_from_bytes(blob, "vrp-another")


def test_batched_targets_match_single_calls(pipe, samples):
    refs = [pipe.encode_reference(s.image, mask=s.gt_mask) for s in samples[:2]]
    embs = [pipe.embed(s.image) for s in samples[1:3]]
    batched = pipe.reference_masks(embs, refs)
    for e, r, m in zip(embs, refs, batched, strict=True):
        assert _agree(pipe.reference_masks([e], [r])[0], m) >= 0.999
    cat = ReferenceFeatures.cat([r.features for r in refs])
    assert len(cat) == 2 and [len(p) for p in cat.split()] == [1, 1]


def test_point_and_box_annotations_become_sams_mask(pipe, samples):
    s = samples[0]
    emb = pipe.embed(s.image)
    by_point = pipe.encode_reference(emb, points=[list(s.point_index)])
    cands = pipe.decode_points(emb, [__import__("biprompt.prompts", fromlist=["x"]).make_prompt(
        emb.original_size, [list(s.point_index)], mode="point")])[0]
    top = cands.masks[int(np.argmax(cands.scores))]
    if top.any():
        assert np.array_equal(by_point.mask, top)
    x0, y0, x1, y1 = s.target_object.bbox
    by_box = pipe.encode_reference(emb, box=[x0, y0, x1, y1])
    assert by_box.mask.shape == s.image.shape[:2] and by_box.mask.any()


def test_bad_annotations_are_clear_errors(pipe, samples):
    s = samples[0]
    emb = pipe.embed(s.image)
    h, w = s.image.shape[:2]
    cases = [
        (dict(), "one annotation"),
        (dict(mask=s.gt_mask, points=[[1, 1]]), "one annotation"),
        (dict(mask=np.zeros((h, w), bool)), "empty"),
        (dict(mask=np.ones((h + 1, w), bool)), "reference image is"),
        (dict(points=[[w + 5, 1]]), "outside"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidPromptError, match=match):
            pipe.encode_reference(emb, **kwargs)


def test_reference_votes_and_reports_agreement(pipe, samples):
    ref = pipe.encode_reference(samples[0].image, mask=samples[0].gt_mask)
    s = samples[1]
    res = pipe.segment(s.image, [list(s.point_index)], text=s.expression, reference=ref)
    assert set(res.expert_masks) == {"text", "reference"}
    assert set(res.expert_ious) == {"text", "reference"}
    assert all(v.shape == (3,) for v in res.expert_ious.values())
    if res.expert_masks["text"].any() and res.expert_masks["reference"].any():
        assert res.expert_agreement is not None and 0.0 <= res.expert_agreement <= 1.0
    alone = pipe.segment(s.image, None, reference=ref, mode="reference")
    assert alone.strategy == "reference"
    assert np.array_equal(alone.mask, res.expert_masks["reference"])
    point = pipe.segment(s.image, [list(s.point_index)], reference=ref, mode="point")
    assert "reference" not in point.expert_masks  # point mode asks no expert
    with pytest.raises(InvalidPromptError, match="needs a reference"):
        pipe.segment(s.image, [list(s.point_index)], mode="reference")


def test_a_pipeline_without_a_reference_model_says_so(samples):
    from biprompt.profile import ModelProfile

    p = ModelProfile.load(TINY)
    from dataclasses import replace

    plain = BiPromptPipeline.from_profile(replace(p, reference=None))
    assert plain.reference is None and plain.model_ids["reference"] is None
    with pytest.raises(InvalidPromptError, match="no reference model"):
        plain.encode_reference(samples[0].image, mask=samples[0].gt_mask)


def test_profile_reference_section_is_checked():
    from biprompt.profile import ModelProfile

    with pytest.raises(ModelConfigError, match="reference_model needs"):
        ModelProfile.from_dict({"sam": {"variant": "tiny"}, "reference_model": {"seed": 1}})
    with pytest.raises(ModelConfigError, match="selection.rule"):
        ModelProfile.from_dict({"sam": {"variant": "tiny"}, "selection": {"rule": "vote"}})
    for bad in ({"image": 1}, {"text": "heavy"}, {"text": -1}, {"text": 0, "reference": 0}):
        with pytest.raises(ModelConfigError, match="selection.weights"):
            ModelProfile.from_dict({"sam": {"variant": "tiny"}, "selection": {"weights": bad}})
    p = ModelProfile.from_dict({"sam": {"variant": "tiny"},
                                "selection": {"weights": {"reference": 3}}})
    assert p.selection_weights == {"reference": 3.0}


def test_annotation_key_names_image_and_annotation():
    a = annotation_key("img", "mask", b"x")
    assert a == annotation_key("img", "mask", b"x")
    assert len({a, annotation_key("img", "box", b"x"), annotation_key("img2", "mask", b"x"),
                annotation_key("img", "mask", b"y")}) == 4


def test_engine_from_profile_reads_only_decoder_parts():
    eng = ReferenceMaskEngine.from_profile(TINY)
    assert eng.model_id == "vrp-tiny:random-0"
    w = eng.weights()
    assert "vrp" in w and not any("image_encoder" in k for k in w)
    eng.warmup()
    assert eng.time_once() > 0

"""Checkpoints in the official layouts, written here in small shapes, load through the same code as
the real ones and reproduce the reference computations.

Bit-exact checks run segment-anything's reference encoder forward (``fast_encoder=False``) and the
same shapes as the reference. The fast encoder, and texts batched with padding, round otherwise:
they are held to ``ATOL`` on embeddings and logits, and masks to the reference wherever its logit
is farther than ``ATOL`` from 0 (tests/support/parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from biprompt.errors import CheckpointError, ModelConfigError
from biprompt.factory import load_sam
from biprompt.models.beit3 import Beit3Spec
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import save_evf
from biprompt.models.sam import build_sam, get_sam_spec
from biprompt.pipeline import BiPromptPipeline
from biprompt.prompts import make_prompt
from biprompt.text import TextTokenizer
from tests.support.evf_reference import evf_reference_logits
from tests.support.parity import assert_mask_matches_where_sure

# Fast path vs reference: max-abs difference allowed on embeddings, low-res logits and predicted
# IoUs (measured here: 2e-6 on embeddings of magnitude 4, 1e-7 on logits).
ATOL = 1e-4
POINT = [150.0, 100.0]
SENTENCES = ["the red circle", "the small blue square", "the leftmost green triangle",
             "a large yellow circle", "the rightmost red square"] * 20
TEXTS = ["the red circle", "the small blue square", "the leftmost green triangle"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A SAM .pth and an EVF-SAM directory (sharing the SAM's encoder weights, as EVF-SAM's
    frozen encoder does), plus the in-memory models that wrote them."""
    root = tmp_path_factory.mktemp("ckpt")
    spec = get_sam_spec("tiny")
    torch.manual_seed(11)
    sam = build_sam(spec)
    torch.save(sam.state_dict(), root / "sam_tiny.pth")
    tok = TextTokenizer.train(SENTENCES, root / "tok", vocab_size=40)
    beit3 = Beit3Spec(embed_dim=32, layers=2, heads=2, ffn_dim=64, img_size=32, patch_size=8,
                      vocab_size=tok.vocab_size, max_source_positions=40)
    cfg = EvfConfig(hidden_size=32, out_dim=spec.prompt_dim, mm_extractor_scale="custom",
                    sam_scale="custom", sam_spec=spec, beit3_spec=beit3)
    torch.manual_seed(12)
    evf = EvfSam(cfg).eval()
    evf.visual_model.image_encoder.load_state_dict(sam.image_encoder.state_dict())
    save_evf(evf, root / "evf", tokenizer=tok.tokenizer)
    save_evf(evf, root / "evf_bin", tokenizer=tok.tokenizer, safetensors=False)
    return root, sam, evf, tok


def test_sam_pth_loads_and_reproduces_predictor(written, rgb_image):
    root, sam, _, _ = written
    loaded = load_sam(root / "sam_tiny.pth")
    assert loaded.spec.name == "tiny"  # read back from the shapes
    pipe = BiPromptPipeline.from_models(loaded, fast_encoder=False)  # bit for bit: the reference
    predictor = SamPredictor(sam)
    predictor.set_image(rgb_image)
    ref, scores, _ = predictor.predict(np.array([POINT]), np.array([1]), multimask_output=True)
    res = pipe.segment(rgb_image, [POINT], mode="point")
    np.testing.assert_array_equal(res.candidates, ref)
    np.testing.assert_allclose(res.candidate_scores, scores, atol=1e-5)


def test_sam_pth_fast_encoder_matches_predictor_within_tolerance(written, rgb_image):
    """The default (fast) encoder: embeddings, low-res logits and scores within ATOL of
    SamPredictor's, masks equal wherever the reference logit is farther than ATOL from 0."""
    root, sam, _, _ = written
    pipe = BiPromptPipeline.from_models(load_sam(root / "sam_tiny.pth"), fast_encoder=True)
    predictor = SamPredictor(sam)
    predictor.set_image(rgb_image)
    logits, scores, low = predictor.predict(np.array([POINT]), np.array([1]),
                                            multimask_output=True, return_logits=True)
    emb = pipe.embed(rgb_image)
    torch.testing.assert_close(emb.embedding, predictor.features, rtol=0, atol=ATOL)
    (got,) = pipe.decode_points(emb, [make_prompt(emb.original_size, [POINT], mode="point")])
    np.testing.assert_allclose(got.low_res_logits, low, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=ATOL)
    for mask, ref in zip(got.masks, logits, strict=True):
        assert_mask_matches_where_sure(mask, ref, ATOL)


@pytest.mark.parametrize("sub", ["evf", "evf_bin"])
def test_evf_directory_matches_reference(written, rgb_image, sub):
    """One text per call on the reference encoder: EVF-SAM's arithmetic on its shapes, bit for
    bit."""
    root, _, evf, tok = written
    pipe = BiPromptPipeline.from_pretrained(root / "sam_tiny.pth", root / sub, fast_encoder=False)
    emb = pipe.embed(rgb_image)
    for text in TEXTS:
        ref = evf_reference_logits(evf, tok, rgb_image, text) > 0
        (mask,) = pipe.text_masks([emb], [text])
        assert mask.shape == rgb_image.shape[:2]
        assert ref.any() and not ref.all()
        np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_evf_batched_padded_texts_match_reference_where_it_is_sure(written, rgb_image, fast):
    """Texts of different lengths in one call (padded), on either encoder: other shapes and
    kernels than the reference's, so masks are held to it where its logit is beyond ATOL."""
    root, _, evf, tok = written
    pipe = BiPromptPipeline.from_pretrained(root / "sam_tiny.pth", root / "evf", fast_encoder=fast)
    emb = pipe.embed(rgb_image)
    got = pipe.text_masks([emb] * len(TEXTS), TEXTS)  # one batched call, padded texts
    for text, mask in zip(TEXTS, got, strict=True):
        assert_mask_matches_where_sure(mask, evf_reference_logits(evf, tok, rgb_image, text), ATOL)


def test_evf_config_roundtrip_is_hf_shaped(written):
    root = written[0]
    cfg = json.loads((root / "evf" / "config.json").read_text())
    assert cfg["model_type"] == "evf" and cfg["architectures"] == ["EvfSamModel"]
    assert {"hidden_size", "out_dim", "sam_scale", "mm_extractor_scale"} <= set(cfg)
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (root / "evf" / name).is_file()


def test_sam_from_evf_visual_model(written, rgb_image):
    root, _, evf, _ = written
    loaded = load_sam(root / "evf")
    assert loaded.model_id.endswith("visual_model")
    for k, v in evf.visual_model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)


def test_wrong_variant_names_first_mismatched_key(written):
    root = written[0]
    with pytest.raises(CheckpointError, match=r"image_encoder\.pos_embed.*shape"):
        load_sam(root / "sam_tiny.pth", "vit_b")


def test_missing_and_unexpected_keys_are_named(written, tmp_path):
    root = written[0]
    state = torch.load(root / "sam_tiny.pth", weights_only=True)
    dropped = dict(state)
    dropped.pop("mask_decoder.iou_token.weight")
    torch.save(dropped, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing.*mask_decoder.iou_token.weight"):
        load_sam(tmp_path / "missing.pth", "tiny")
    extra = dict(state, **{"mask_decoder.bogus": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected.*mask_decoder.bogus"):
        load_sam(tmp_path / "extra.pth", "tiny")


def test_evf_checkpoint_with_wrong_shape_is_rejected(written, tmp_path):
    from safetensors.torch import load_file, save_file

    root = written[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (root / "evf").iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(root / "evf" / "model.safetensors"))
    state["text_hidden_fcs.0.2.weight"] = torch.zeros(7, 32)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"text_hidden_fcs\.0\.2\.weight.*\[7, 32\]"):
        BiPromptPipeline.from_pretrained(root / "sam_tiny.pth", bad)


def test_mismatched_sam_scale_is_refused(written):
    root = written[0]
    vit_b_spec = get_sam_spec("vit_b")
    with torch.device("meta"):
        state = build_sam(vit_b_spec).state_dict()
    # don't build a real vit_b: only the compatibility check is under test
    from biprompt.engines.text_mask import check_pairing
    from biprompt.factory import load_text_model

    text = load_text_model(root / "evf")
    with pytest.raises(ModelConfigError, match="same scale"):
        check_pairing(vit_b_spec, None, text)
    assert state  # built on meta only


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ModelConfigError, match="unknown SAM variant 'vit_x'"):
        get_sam_spec("vit_x")


def test_fp16_and_bf16_pipelines_run(written, rgb_image):
    root = written[0]
    for dtype in ("bfloat16", "float16"):
        pipe = BiPromptPipeline.from_pretrained(root / "sam_tiny.pth", root / "evf", dtype=dtype)
        res = pipe.segment(rgb_image, [[150, 100]], text="the red circle")
        assert res.mask.shape == rgb_image.shape[:2] and res.mask.dtype == bool
        assert pipe.encoder.encoder.pos_embed.dtype == getattr(torch, dtype)


def test_files_are_written_in_official_layout(written):
    root = written[0]
    state = torch.load(root / "sam_tiny.pth", weights_only=True)
    assert isinstance(state, dict)
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert Path(root / "evf" / "model.safetensors").is_file()
    assert Path(root / "evf_bin" / "pytorch_model.bin").is_file()

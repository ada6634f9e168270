"""The exported text prompt (BEiT-3 + projection on ONNX Runtime / OpenVINO) against the torch
engine: prompts and masks for batches of 1 and 16, token counts other than the traced one,
padding honoured; the export cache; what the engine holds; the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biprompt.engines.exported_text import (
    EXAMPLE_TOKENS,
    ExportedTextMaskEngine,
    text_filename,
)
from biprompt.engines.text_mask import TextMaskEngine
from biprompt.errors import ModelConfigError
from biprompt.factory import TINY_WORDS, load_text, open_sam
from biprompt.models.decoding import upscale_logits
from biprompt.preprocess import sam_input_size
from biprompt.profile import ModelProfile
from biprompt.types import ImageEmbedding

TINY = "configs/models/tiny.yaml"
RUNTIMES = ("onnxruntime", "openvino")
PROMPT_TOL = 1e-4
LOGIT_TOL = 2e-5  # masks may differ only where the torch logit is this close to 0 (the tiny
# model's logits are about 0.07 at most and move about 0.03x what its prompt moves; both runtimes
# land within 1e-7 of torch)
SIZES = [(480, 640), (640, 480), (300, 1000), (1024, 1024)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's export cache: each graph is exported once for the module."""
    return tmp_path_factory.mktemp("weights") / "onnx"


@pytest.fixture(scope="module")
def engines(cache):
    """The tiny profile's text model on torch and on both runtimes (one export between them)."""
    out = {"torch": TextMaskEngine.from_profile(TINY)}
    for runtime in RUNTIMES:
        out[runtime] = ExportedTextMaskEngine.from_profile(TINY, runtime=runtime, cache_dir=cache)
    return out


def embeddings(engine, n: int, seed: int = 0) -> list[ImageEmbedding]:
    """n random embeddings (and text-model views) of images of several sizes."""
    spec, s = engine.sam_spec, engine.config.beit3_spec.img_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        x = torch.randn(1, spec.prompt_dim, spec.embedding_size, spec.embedding_size, generator=g)
        view = (torch.rand(1, 3, s, s, generator=g) * 2 - 1)
        out.append(ImageEmbedding(x, size, sam_input_size(size, spec.img_size),
                                  engine.sam_model_id, view))
    return out


def expressions(n: int, seed: int = 0) -> list[str]:
    """n different expressions of 1 to 9 words."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        text = " ".join(rng.choice(TINY_WORDS, size=1 + len(out) % 9))
        if text not in out:
            out.append(text)
    return out


def inputs(engine, embs, texts):
    ids, padding = engine.tokenizer(texts)
    return torch.cat([e.beit_image for e in embs]), ids, padding


def low_res(engine, embs, prompt) -> torch.Tensor:
    image = torch.cat([e.embedding for e in embs])
    with torch.no_grad():
        return engine.model.decode(image, prompt).float()


def assert_parity(ref: TextMaskEngine, got: TextMaskEngine, embs, texts) -> None:
    """Prompts within PROMPT_TOL, the logits they give within LOGIT_TOL, and `text_masks` equal
    except where the torch logit is within LOGIT_TOL of 0 (upscaling is a convex combination,
    so it never widens the logits' difference)."""
    beit, ids, padding = inputs(ref, embs, texts)
    with torch.no_grad():
        want = ref._prompt(beit, ids, padding)
    have = got._prompt(beit, ids, padding)
    assert have.shape == want.shape == (len(texts), 1, ref.config.out_dim)
    assert have.dtype == torch.float32
    np.testing.assert_allclose(have.numpy(), want.numpy(), atol=PROMPT_TOL, rtol=0)
    want_logits = low_res(ref, embs, want)
    np.testing.assert_allclose(low_res(got, embs, have).numpy(), want_logits.numpy(),
                               atol=LOGIT_TOL, rtol=0)
    ref_masks, got_masks = ref.text_masks(embs, texts), got.text_masks(embs, texts)
    for i, (e, r, g) in enumerate(zip(embs, ref_masks, got_masks, strict=True)):
        assert g.shape == r.shape == tuple(e.original_size) and g.dtype == bool
        logits = upscale_logits(want_logits[i : i + 1], ref.sam_spec.img_size, e.input_size,
                                e.original_size)[0, 0].numpy()
        assert np.array_equal(r, logits > 0)  # the reference really is the torch logits' mask
        assert not ((g != r) & (np.abs(logits) > LOGIT_TOL)).any()


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("n", [1, 16])
def test_prompts_and_masks_match_torch(engines, runtime, n):
    ref, got = engines["torch"], engines[runtime]
    texts = expressions(n, seed=n)
    if n == 16:
        lengths = {len(ref.tokenizer.tokenizer(t)["input_ids"]) for t in texts}
        assert len(lengths) >= 6  # different token lengths: most rows padded
    assert_parity(ref, got, embeddings(ref, n, seed=n), texts)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_token_counts_other_than_the_traced_one(engines, runtime):
    ref, got = engines["torch"], engines[runtime]
    seen = set()
    for words in (1, 2, 3, 6, 10, 14):  # 5 to 51 tokens
        text = " ".join(TINY_WORDS[i % len(TINY_WORDS)] for i in range(words))
        embs = embeddings(ref, 1, seed=words)
        _, ids, _ = inputs(ref, embs, [text])
        seen.add(ids.shape[1])
        assert_parity(ref, got, embs, [text])
        pair = [text, "red"]  # and padded against a shorter row, in a batch of 2
        assert_parity(ref, got, embeddings(ref, 2, seed=words), pair)
    assert len(seen - {EXAMPLE_TOKENS}) >= 4


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_padding_is_honoured_in_the_graph(engines, runtime):
    """A row's prompt is the same alone as padded beside a longer row."""
    got = engines[runtime]
    embs = embeddings(got, 2, seed=3)
    short, long = "red circle", "the small green triangle leftmost of the large blue square"
    beit, ids, padding = inputs(got, embs, [short, long])
    assert padding[0].any() and not padding[1].any()
    alone = got._prompt(*inputs(got, embs[:1], [short]))
    np.testing.assert_allclose(got._prompt(beit, ids, padding)[0].numpy(), alone[0].numpy(),
                               atol=1e-5, rtol=0)


# --- the export cache -----------------------------------------------------------------------


def test_the_export_is_cached_and_reused(engines, cache):
    first = engines["onnxruntime"]
    path = cache / text_filename(first.export["digest"])
    assert first.graph == path and path.is_file()
    assert first.export["dir"] == str(cache)
    assert not list(cache.glob("*.tmp"))
    assert engines["openvino"].export == {**first.export, "exported": False}  # the same file
    mtime = path.stat().st_mtime_ns
    again = ExportedTextMaskEngine.from_profile(TINY, runtime="onnxruntime", cache_dir=cache)
    assert again.export == {**first.export, "exported": False}
    assert path.stat().st_mtime_ns == mtime


def test_the_cache_is_keyed_by_the_weights(engines, cache):
    other = ExportedTextMaskEngine.from_profile(
        {"sam": {"variant": "tiny", "seed": 0}, "text_model": {"random": True, "seed": 1}},
        runtime="onnxruntime", cache_dir=cache)
    assert other.export["exported"] is True
    assert other.export["digest"] != engines["onnxruntime"].export["digest"]
    assert other.graph != engines["onnxruntime"].graph and other.graph.is_file()


def test_an_unwritable_cache_still_serves(tmp_path, engines):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    engine = ExportedTextMaskEngine.from_profile(TINY, cache_dir=blocker)
    assert isinstance(engine.graph, bytes) and engine.export["exported"] is True
    assert_parity(engines["torch"], engine, embeddings(engine, 2, seed=5), ["red", "blue square"])


# --- what the engine holds ------------------------------------------------------------------


def test_it_holds_the_graph_and_the_decoder_not_beit3(cache):
    p = ModelProfile.load(TINY)
    sam = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
    text = load_text(p.text, sam.spec)
    ref = TextMaskEngine(text, sam.spec, sam.model_id)
    engine = ExportedTextMaskEngine(text, sam.spec, sam.model_id, cache_dir=cache)
    assert engine.backend == "onnxruntime" and engine.describe()["backend"] == "onnxruntime"
    assert engine.model.mm_extractor is None and engine.model.text_hidden_fcs is None
    assert text.model.mm_extractor is not None  # the caller's model is left whole
    held = engine.weights()
    assert set(held) == {"onnx.text_prompt", "evf.prompt_encoder", "evf.mask_decoder",
                         "evf.image_encoder"}
    assert held["onnx.text_prompt"] == engine.graph.stat().st_size
    torch_held = ref.weights()
    for part in ("evf.prompt_encoder", "evf.mask_decoder"):
        assert held[part] == torch_held[part] > 0
    # the graph carries BEiT-3's and the projection's float32 weights
    assert held["onnx.text_prompt"] >= 0.9 * (torch_held["evf.beit3"]
                                              + torch_held["evf.text_hidden_fcs"])
    engine.warmup()
    assert engine.time_once() > 0
    assert_parity(ref, engine, embeddings(ref, 3, seed=7), expressions(3, seed=7))


def test_runtime_threads_can_be_fixed(engines, cache):
    engine = ExportedTextMaskEngine.from_profile(TINY, runtime="openvino", cache_dir=cache,
                                                 threads=1)
    assert engine.runtime.threads == 1 and engine.export["exported"] is False
    assert_parity(engines["torch"], engine, embeddings(engine, 2, seed=8), ["red", "the blue"])


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("place", [{"device": "cuda"}, {"dtype": "float16"},
                                   {"device": "cuda", "dtype": "float32"},
                                   {"dtype": "bfloat16"}])
def test_cuda_and_half_precision_are_refused(cache, runtime, place):
    with pytest.raises(ModelConfigError, match=rf"{runtime} text model runs float32 on the "
                                               r"CPU.*use the torch backend"):
        ExportedTextMaskEngine.from_profile(TINY, runtime=runtime, cache_dir=cache, **place)


def test_an_unknown_runtime_is_refused(cache):
    with pytest.raises(ModelConfigError, match="no text-model runtime 'tensorrt'"):
        ExportedTextMaskEngine.from_profile(TINY, runtime="tensorrt", cache_dir=cache)

"""The exported point decoder on ONNX Runtime and on OpenVINO against the torch one: logits, IoUs
and masks at four aspect ratios, batches of 1 and 16, points, boxes, mask_input, single- and
multimask; the export cache; the backend choice; the batched-or-looped choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biprompt.engines import (
    OnnxPointDecoderEngine,
    PointDecoderEngine,
    engine_from_profile,
    point_decoder_for,
)
from biprompt.engines.onnx_decoder import PARTS
from biprompt.errors import ModelConfigError
from biprompt.factory import open_sam
from biprompt.models.decoding import upscale_logits
from biprompt.models.sam import build_sam, get_sam_spec
from biprompt.preprocess import sam_input_size
from biprompt.profile import ModelProfile
from biprompt.prompts import make_prompt
from biprompt.types import ImageEmbedding

TINY = "configs/models/tiny.yaml"
TOL = 1e-4
SIZES = [(480, 640), (640, 480), (1024, 1024), (300, 1000)]
LOGITS = 4 * get_sam_spec("tiny").embedding_size  # the tiny model's low-res logits side


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's export cache, laid out as BIPROMPT_CACHE=cache.parent would place it."""
    return tmp_path_factory.mktemp("weights") / "onnx"


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def engines(cache, request):
    """The tiny profile's decoder on torch and on one CPU runtime (one export for the module:
    both runtimes read the same files)."""
    src = open_sam(None, "tiny", 0)
    return (point_decoder_for(src, "torch"),
            point_decoder_for(src, request.param, cache_dir=cache))


def embedding(engine, size: tuple[int, int], seed: int = 0) -> ImageEmbedding:
    spec = engine.spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, spec.prompt_dim, spec.embedding_size, spec.embedding_size, generator=g)
    return ImageEmbedding(x, size, sam_input_size(size, spec.img_size), engine.model_id)


def prompts(size, n: int, *, box=False, mask=False, multimask=True, points=1, seed=0):
    h, w = size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pts = rng.uniform((0, 0), (w - 1, h - 1), size=(points, 2)) if points else None
        labels = rng.integers(0, 2, points) if points else None
        b = None
        if box:
            x0, x1 = sorted(rng.uniform(0, w, 2))
            y0, y1 = sorted(rng.uniform(0, h, 2))
            b = [x0, y0, x1, y1]
        m = rng.normal(0, 8, (LOGITS, LOGITS)).astype(np.float32) if mask else None
        out.append(make_prompt(size, pts, labels, box=b, mask_input=m, multimask=multimask,
                               mode="point"))
    return out


def assert_parity(ref, got, emb, spec, tol: float = TOL) -> float:
    """Logits and IoUs within tol; masks equal except where the reference logit is within tol of
    0. Returns the largest logit difference."""
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        assert g.masks.shape == r.masks.shape and g.masks.dtype == bool
        np.testing.assert_allclose(g.scores, r.scores, atol=tol, rtol=0)
        np.testing.assert_allclose(g.low_res_logits, r.low_res_logits, atol=tol, rtol=0)
        worst = max(worst, float(np.abs(g.low_res_logits - r.low_res_logits).max()))
        logits = upscale_logits(torch.from_numpy(r.low_res_logits)[None], spec.img_size,
                                emb.input_size, emb.original_size)[0].numpy()
        differ = g.masks != r.masks
        assert not (differ & (np.abs(logits) > tol)).any()
    return worst


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", [1, 16])
def test_points_match_torch_at_every_aspect_ratio(engines, size, n):
    ref_engine, onnx = engines
    emb = embedding(ref_engine, size)
    ps = prompts(size, n, seed=n)
    ref, got = ref_engine.decode_points(emb, ps), onnx.decode_points(emb, ps)
    assert got[0].masks.shape == (3, *size) and got[0].low_res_logits.shape == (3, LOGITS, LOGITS)
    assert_parity(ref, got, emb, ref_engine.spec)


@pytest.mark.parametrize("size", [(480, 640), (300, 1000)])
@pytest.mark.parametrize("kind", [
    {"box": True},                                  # points + box: no padding point
    {"box": True, "points": 0},                     # a box alone
    {"mask": True, "points": 2, "multimask": False},  # a refinement click
    {"mask": True, "box": True, "points": 3},
    {"multimask": False, "points": 2},
])
def test_boxes_masks_and_single_mask_match_torch(engines, size, kind):
    ref_engine, onnx = engines
    emb = embedding(ref_engine, size, seed=1)
    for n in (1, 16):
        ps = prompts(size, n, seed=7 * n, **kind)
        ref, got = ref_engine.decode_points(emb, ps), onnx.decode_points(emb, ps)
        assert got[0].masks.shape[0] == (3 if kind.get("multimask", True) else 1)
        assert_parity(ref, got, emb, ref_engine.spec)


def test_mixed_prompt_shapes_in_one_call_keep_their_order(engines):
    ref_engine, onnx = engines
    size = (640, 480)
    emb = embedding(ref_engine, size, seed=2)
    ps = [*prompts(size, 2), *prompts(size, 2, box=True, seed=3),
          *prompts(size, 1, mask=True, multimask=False, seed=4), *prompts(size, 3, points=2)]
    assert_parity(ref_engine.decode_points(emb, ps), onnx.decode_points(emb, ps), emb,
                  ref_engine.spec)


# --- batching -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [0, 1])
def test_batched_and_looped_give_the_same_answers(engines, backend):
    engine = engines[backend]
    size = (480, 640)
    emb = embedding(engine, size, seed=5)
    ps = prompts(size, 16, seed=5) + prompts(size, 4, box=True, mask=True, seed=6)
    saved = engine.batching.batched
    try:
        engine.batching.batched = True
        batched = engine.decode_points(emb, ps)
        engine.batching.batched = False
        looped = engine.decode_points(emb, ps)
    finally:
        engine.batching.batched = saved
    assert_parity(batched, looped, emb, engine.spec, tol=1e-5)


def test_warmup_measures_batching_once_and_decode_follows_it(cache):
    engine = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime", cache_dir=cache)
    assert not engine.batching.measured and engine.batching.batched  # until measured: batched
    engine.warmup()
    choice = engine.describe()["batching"]
    assert choice["measured"] and choice["prompts"] == 16
    assert choice["mode"] == ("batched" if choice["batched_ms"] <= choice["looped_ms"]
                              else "looped")
    calls = []
    run = engine._run
    engine._run = lambda image, inputs: calls.append(len(inputs)) or run(image, inputs)
    size = (300, 1000)
    engine.batching.batched = False
    engine.decode_points(embedding(engine, size), prompts(size, 4))
    assert calls == [1, 1, 1, 1]
    calls.clear()
    engine.batching.batched = True
    engine.decode_points(embedding(engine, size), prompts(size, 4))
    assert calls == [4]

    fixed = point_decoder_for(open_sam(None, "tiny", 0), "torch", batching="looped")
    fixed.warmup()
    assert not fixed.batching.batched and not fixed.batching.measured


# --- the export cache -----------------------------------------------------------------------


def test_the_export_is_cached_and_reused(engines, cache):
    _, onnx = engines
    files = {p: cache / f for p, f in ((p, onnx.graphs[p].name) for p in PARTS)}
    assert all(f.is_file() for f in files.values())
    assert not list(cache.glob("*.tmp"))  # written atomically: no temporary left
    mtimes = {p: f.stat().st_mtime_ns for p, f in files.items()}
    again = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime", cache_dir=cache)
    assert again.export["exported"] == [] and again.export["digest"] == onnx.export["digest"]
    assert {p: f.stat().st_mtime_ns for p, f in files.items()} == mtimes
    assert set(again.weights()) == {"onnx.decoder", "onnx.decoder_mask"}


def test_the_cache_is_keyed_by_the_checkpoint(tmp_path, cache):
    spec = get_sam_spec("tiny")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"sam_tiny_{seed}.pth"
        torch.save(build_sam(spec).state_dict(), path)  # segment-anything's own layout
        paths.append(path)
    built = [engine_from_profile("points", {"sam": {"checkpoint": str(p),
                                                    "decoder_backend": "onnxruntime"}},
                                 cache_dir=cache) for p in paths]
    assert all(isinstance(e, OnnxPointDecoderEngine) for e in built)
    assert [e.export["exported"] for e in built] == [list(PARTS)] * 2
    assert built[0].export["digest"] != built[1].export["digest"]
    again = engine_from_profile("points", {"sam": {"checkpoint": str(paths[0]),
                                                   "decoder_backend": "onnxruntime"}},
                                cache_dir=cache)
    assert again.export["exported"] == [] and again.export["digest"] == built[0].export["digest"]
    seeded = point_decoder_for(open_sam(None, "tiny", 1), "onnxruntime", cache_dir=cache)
    assert seeded.export == {**again.export, "exported": []}  # the same weights, however named


def test_the_default_cache_is_beside_the_weights_cache(engines, cache, monkeypatch):
    monkeypatch.setenv("BIPROMPT_CACHE", str(cache.parent))
    engine = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime")
    assert all(p.parent == cache for p in engine.graphs.values())
    assert engine.export["exported"] == []


def test_an_unwritable_cache_still_serves(tmp_path, engines):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    engine = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime", cache_dir=blocker)
    assert all(isinstance(g, bytes) for g in engine.graphs.values())
    size = (480, 640)
    emb = embedding(engine, size)
    ps = prompts(size, 2)
    assert_parity(engines[0].decode_points(emb, ps), engine.decode_points(emb, ps), emb,
                  engine.spec)


# --- choosing the backend -------------------------------------------------------------------


def test_profile_field_and_the_factory_choice(cache):
    assert ModelProfile.load(TINY).sam.decoder_backend == "torch"
    assert isinstance(engine_from_profile("points", TINY), PointDecoderEngine)
    p = {"sam": {"variant": "tiny", "decoder_backend": "onnxruntime"}}
    assert isinstance(engine_from_profile("points", p, cache_dir=cache), OnnxPointDecoderEngine)
    with pytest.raises(ModelConfigError, match="decoder_backend"):
        ModelProfile.load({"sam": {"variant": "tiny", "decoder_backend": "tensorrt"}})
    with pytest.raises(ModelConfigError, match="float32 on the CPU"):
        point_decoder_for(open_sam(None, "tiny"), "onnxruntime", dtype="float16")


def test_auto_times_every_backend_and_records_it(tmp_path):
    engine = point_decoder_for(open_sam(None, "tiny", 0), "auto", cache_dir=tmp_path)
    choice = engine.backend_choice
    assert choice["chosen"] == engine.backend
    backends = ("torch", "onnxruntime", "openvino")
    assert all(choice[f"{b}_ms"] > 0 for b in backends)
    assert engine.backend == min(backends, key=lambda b: choice[f"{b}_ms"])
    assert engine.describe()["backend_choice"] == choice
    off_cpu = point_decoder_for(open_sam(None, "tiny", 0), "auto", dtype="bfloat16")
    assert off_cpu.backend == "torch" and "CPU" in off_cpu.backend_choice["reason"]


def test_the_pipeline_serves_on_onnxruntime(engines, cache, monkeypatch):
    from biprompt.pipeline import BiPromptPipeline

    monkeypatch.setenv("BIPROMPT_CACHE", str(cache.parent))
    pipe = BiPromptPipeline.from_profile({"sam": {"variant": "tiny",
                                                  "decoder_backend": "onnxruntime"}})
    assert pipe.decoder.backend == "onnxruntime" and pipe.decoder.export["exported"] == []
    size = (300, 1000)
    emb = embedding(engines[0], size, seed=9)
    got = pipe.segment(emb, [[500, 100]], mode="point")
    ref = engines[0].decode_points(emb, [make_prompt(size, [[500, 100]], mode="point")])[0]
    np.testing.assert_allclose(got.candidate_scores, ref.scores, atol=TOL)
    assert got.selected == int(np.argmax(ref.scores))


def test_sessions_follow_torch_threads_unless_set(cache):
    engine = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime", cache_dir=cache)
    fixed = point_decoder_for(open_sam(None, "tiny", 0), "onnxruntime", cache_dir=cache,
                              threads=1)
    def threads(e):
        return e._runtimes["decoder"]._open_threads

    before = torch.get_num_threads()
    assert threads(engine) == before and threads(fixed) == 1
    size = (480, 640)
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        engine.decode_points(embedding(engine, size), prompts(size, 1))
        fixed.decode_points(embedding(engine, size), prompts(size, 1))
        assert threads(engine) == torch.get_num_threads() and threads(fixed) == 1
    finally:
        torch.set_num_threads(before)

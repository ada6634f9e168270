"""Engine backends: the image encoder exported to ONNX Runtime and OpenVINO against torch (four
aspect ratios, batches of 1 and 16, both attention paths); the export cache; the profile's
`backends:` and the app's override; `auto`'s measured, remembered choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biprompt.engines import ExportedEncoderEngine, ImageEncoderEngine, encoder_for
from biprompt.engines.backends import CHOICES_FILE, choose, read_choices
from biprompt.errors import ModelConfigError
from biprompt.factory import open_sam
from biprompt.profile import Backends, ModelProfile

TOL = 1e-4
SIZES = [(480, 640), (640, 480), (1024, 1024), (300, 1000)]
RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("weights") / "onnx"


@pytest.fixture(scope="module")
def encoders(cache):
    """The tiny SAM's encoder on torch and on each CPU runtime (one export: both read it)."""
    src = open_sam(None, "tiny", 0)
    return {b: encoder_for(src, None, b, cache_dir=cache) for b in ("torch", *RUNTIMES)}


def images(size: tuple[int, int], n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("size", SIZES)
def test_embeddings_match_torch_at_every_aspect_ratio(encoders, runtime, size):
    rgbs = images(size, 1, seed=size[0])
    ref, got = encoders["torch"].embed_rgb(rgbs)[0], encoders[runtime].embed_rgb(rgbs)[0]
    assert got.embedding.shape == ref.embedding.shape and got.embedding.dtype == torch.float32
    assert (got.original_size, got.input_size) == (ref.original_size, ref.input_size)
    np.testing.assert_allclose(got.embedding.numpy(), ref.embedding.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_of_16_mixed_sizes_matches_torch(encoders, runtime):
    rgbs = [im for i, size in enumerate(SIZES * 4) for im in images(size, 1, seed=i)]
    ref, got = encoders["torch"].embed_rgb(rgbs), encoders[runtime].embed_rgb(rgbs)
    assert len(got) == 16
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g.embedding.numpy(), r.embedding.numpy(), atol=TOL, rtol=0)
        assert g.original_size == r.original_size


def test_the_reference_attention_path_exports_too(cache):
    src = open_sam(None, "tiny", 0)
    ref = encoder_for(src, None, "torch", fast_encoder=False)
    got = encoder_for(src, None, "openvino", fast_encoder=False, cache_dir=cache)
    assert got.export["exported"] and got.graph.name.endswith("-reference.onnx")
    rgbs = images((300, 1000), 2, seed=4)
    for r, g in zip(ref.embed_rgb(rgbs), got.embed_rgb(rgbs), strict=True):
        np.testing.assert_allclose(g.embedding.numpy(), r.embedding.numpy(), atol=TOL, rtol=0)


def test_the_export_is_cached_once_and_holds_the_weights(encoders, cache):
    ort, ov = encoders["onnxruntime"], encoders["openvino"]
    assert ort.export["exported"] != ov.export["exported"]  # the second read the first's file
    assert ort.graph == ov.graph and ort.graph.parent == cache and ort.graph.is_file()
    assert not list(cache.glob("*.tmp"))
    assert ort.encoder is None  # no torch copy of the weights kept
    assert set(ort.weights()) == {"onnx.image_encoder"}
    assert ort.weights()["onnx.image_encoder"] >= 0.9 * sum(encoders["torch"].weights().values())
    other = encoder_for(open_sam(None, "tiny", 1), None, "onnxruntime", cache_dir=cache)
    assert other.export["exported"] and other.export["digest"] != ort.export["digest"]


def test_the_cpu_runtimes_refuse_other_devices_and_dtypes(cache):
    src = open_sam(None, "tiny", 0)
    with pytest.raises(ModelConfigError, match="float32 on the CPU"):
        encoder_for(src, None, "onnxruntime", dtype="bfloat16", cache_dir=cache)
    with pytest.raises(ModelConfigError, match="no image-encoder runtime"):
        ExportedEncoderEngine(None, src.spec, src.model_id, runtime="tensorrt")
    with pytest.raises(ModelConfigError, match="encoder backend is 'tensorrt'"):
        encoder_for(src, None, "tensorrt")
    off_cpu = encoder_for(src, None, "auto", dtype="bfloat16", cache_dir=cache)
    assert off_cpu.backend == "torch" and "float32 on the CPU" in off_cpu.backend_choice["reason"]


# --- choosing ------------------------------------------------------------------------------


def test_auto_measures_every_backend_then_remembers(tmp_path):
    src = open_sam(None, "tiny", 0)
    first = encoder_for(src, None, "auto", cache_dir=tmp_path)
    choice = first.backend_choice
    backends = ("torch", *RUNTIMES)
    assert all(choice[f"{b}_ms"] > 0 for b in backends) and choice["rounds"] >= 3
    assert first.backend == choice["chosen"] == min(backends, key=lambda b: choice[f"{b}_ms"])
    assert first.describe()["backend_choice"] == choice
    remembered = read_choices(tmp_path)
    (key, stored), = remembered.items()
    assert stored == choice and key.startswith("encoder|") and "threads=" in key

    again = encoder_for(src, None, "auto", cache_dir=tmp_path)
    assert again.backend == first.backend
    assert again.backend_choice == {**choice, "remembered": True}

    # another choice on file is followed as it is (proof that the file is read, not re-timed)
    other = next(b for b in backends if b != first.backend)
    (tmp_path / CHOICES_FILE).write_text(json.dumps({key: {**choice, "chosen": other}}))
    assert encoder_for(src, None, "auto", cache_dir=tmp_path).backend == other
    # other weights: another key, measured afresh
    encoder_for(open_sam(None, "tiny", 3), None, "auto", cache_dir=tmp_path)
    assert len(read_choices(tmp_path)) == 2


class _Engine:
    def __init__(self, backend: str, ms: float):
        self.backend, self.ms, self.calls = backend, ms, 0

    def time_once(self) -> float:
        self.calls += 1
        return self.ms


def test_choose_keeps_the_fastest_and_skips_a_backend_that_fails(tmp_path):
    def broken():
        raise RuntimeError("no such runtime here")

    built = {}

    def build(name, ms):
        def make():
            built[name] = _Engine(name, ms)
            return built[name]
        return make

    best = choose("points", "auto", {"torch": build("torch", 3.0), "onnxruntime": broken,
                                     "openvino": build("openvino", 1.0)},
                  digest=lambda: "d", cache_dir=tmp_path)
    assert best.backend == "openvino" and best.backend_choice["torch_ms"] == 3.0
    assert "no such runtime" in best.backend_choice["failed"]["onnxruntime"]
    assert built["torch"].calls == built["openvino"].calls == 1 + 5  # untimed + 5 rounds
    assert read_choices(tmp_path) == {}  # a partial measurement isn't remembered
    assert choose("points", "torch", {"torch": build("torch", 9.0)}).ms == 9.0


# --- configuration -------------------------------------------------------------------------


def test_profile_backends_and_the_older_decoder_field():
    p = ModelProfile.load({"sam": {"variant": "tiny"}, "backends": {"encoder": "openvino",
                                                                    "text": "auto"}})
    assert p.backends == Backends(encoder="openvino", points="torch", text="auto")
    old = ModelProfile.load({"sam": {"variant": "tiny", "decoder_backend": "onnxruntime"}})
    assert old.backends.points == "onnxruntime" and old.sam.decoder_backend == "onnxruntime"
    both = ModelProfile.load({"sam": {"variant": "tiny", "decoder_backend": "onnxruntime"},
                              "backends": {"points": "openvino"}})
    assert both.backends.points == "openvino"  # `backends:` wins over the alias
    with pytest.raises(ModelConfigError, match="backends.encoder is 'tensorrt'"):
        ModelProfile.load({"backends": {"encoder": "tensorrt"}})
    with pytest.raises(ModelConfigError, match="unknown role"):
        ModelProfile.load({"backends": {"decoder": "torch"}})
    over = p.with_options(backends={"points": "auto"})
    assert over.backends == Backends(encoder="openvino", points="auto", text="auto")
    assert over.sam.decoder_backend == "auto"


def test_the_demo_profile_and_the_local_serve_config_default_to_auto():
    import yaml

    assert ModelProfile.load("configs/models/demo.yaml").backends == Backends("auto", "auto",
                                                                              "auto")
    cfg = yaml.safe_load(open("configs/serve/local-cpu.yaml"))
    args = cfg["applications"][0]["args"]
    from deployments.settings import AppArgs

    app = AppArgs(**args)
    assert app.profile().backends == Backends("auto", "auto", "auto")
    assert AppArgs(model_profile="configs/models/tiny.yaml",
                   backends={"text": "openvino"}).profile().backends.text == "openvino"
    with pytest.raises(ValueError):
        AppArgs(backends={"encoder": "tensorrt"})


def test_the_pipeline_runs_on_the_cpu_runtimes(cache, monkeypatch, encoders):
    from biprompt.pipeline import BiPromptPipeline

    monkeypatch.setenv("BIPROMPT_CACHE", str(cache.parent))
    ref = BiPromptPipeline.from_profile("configs/models/tiny.yaml")
    pipe = BiPromptPipeline.from_profile("configs/models/tiny.yaml",
                                         backends={"encoder": "openvino",
                                                   "points": "onnxruntime"})
    assert (pipe.encoder.backend, pipe.decoder.backend) == ("openvino", "onnxruntime")
    rgb = images((240, 320), 1, seed=11)[0]
    a = ref.segment(ref.embed(rgb), [[100, 120]], mode="point")
    b = pipe.segment(pipe.embed(rgb), [[100, 120]], mode="point")
    np.testing.assert_allclose(b.candidate_scores, a.candidate_scores, atol=1e-3)
    assert (a.mask != b.mask).mean() < 1e-3


def test_default_engine_is_still_torch(encoders):
    assert type(encoders["torch"]) is ImageEncoderEngine and encoders["torch"].backend == "torch"


def test_a_replica_chooses_again_at_the_thread_count_it_runs(tmp_path, monkeypatch):
    """A replica loads on Ray's one thread, then its user_config sets torch_threads: an `auto`
    choice made at the other count is made again (and remembered for that count)."""
    from biprompt.engines import point_decoder_for
    from deployments.common import chosen_again
    from deployments.settings import AppArgs

    monkeypatch.setenv("BIPROMPT_CACHE", str(tmp_path))
    args = AppArgs(model_profile="configs/models/tiny.yaml", backends={"points": "auto"})
    engine = point_decoder_for(open_sam(None, "tiny", 0), "auto")
    before = torch.get_num_threads()
    assert engine.backend_choice["threads"] == before
    assert chosen_again(engine, "points", args) is engine
    fixed = point_decoder_for(open_sam(None, "tiny", 0), "torch")
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        again = chosen_again(engine, "points", args)
        assert again is not engine and again.backend_choice["threads"] == torch.get_num_threads()
        assert again.batching.measured  # warmed up again: its batching measured at this count
        assert chosen_again(fixed, "points", args) is fixed  # not chosen by `auto`: kept
        keys = read_choices(tmp_path / "onnx")
        assert {k.split("|")[3] for k in keys} == {f"threads={before}",
                                                   f"threads={torch.get_num_threads()}"}
    finally:
        torch.set_num_threads(before)

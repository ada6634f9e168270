"""Each deployment constructed directly with a fake engine: no Ray cluster, no model weights.

What is under test is the deployment's own logic (batching, the cache, error behaviour, the
fan-out of the Ingress); the engines are fakes that record how they were called. `@serve.batch`
needs a replica context only to read `max_ongoing_requests`; the `replica` fixture supplies one.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from biprompt_client.schema import SegmentRequest

from biprompt.cache import (
    Cached,
    LocalStore,
    embedding_header,
    embedding_key,
    image_id,
    unpack_embedding,
    unpack_mask_rle,
)
from biprompt.errors import InvalidPromptError, NotFoundError
from biprompt.factory import TextInfo
from biprompt.models.sam import get_sam_spec
from biprompt.types import ImageEmbedding, PointCandidates
from deployments import ingress as ingress_module
from deployments.common import unpack_bits
from deployments.embeddings import EmbeddingRef
from deployments.encoder import ImageEncoder
from deployments.point_decoder import PointDecoder
from deployments.selector import Selector
from deployments.settings import AppArgs
from deployments.text_mask import TextMask

SPEC = get_sam_spec("tiny")
SAM_ID = "sam-tiny:fake"
TEXT_ID = "evf:fake"
ARGS = AppArgs(model_profile="configs/models/tiny.yaml", agreement_threshold=0.1, api_key=None,
               cache_url=None)


BATCHED = (ImageEncoder._encode, PointDecoder._decode, TextMask._run)
DEFAULT_BATCHING = {m: (m._get_max_batch_size(), m._get_batch_wait_timeout_s()) for m in BATCHED}


def _reset_batch_queues():
    # NOTE: @serve.batch keeps one queue per decorated method (a replica process holds one
    # instance), bound to the event loop of its first call and sized by reconfigure(). Each test
    # runs its own loop, so each starts with fresh queues at the decorator's defaults.
    for method in BATCHED:
        method.set_max_batch_size.__self__._queue = None
        size, wait = DEFAULT_BATCHING[method]
        method.set_max_batch_size(size)
        method.set_batch_wait_timeout_s(wait)


@pytest.fixture
def replica(monkeypatch):
    ctx = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr("ray.serve.get_replica_context", lambda: ctx)
    _reset_batch_queues()
    yield
    _reset_batch_queues()


def run(coro):
    """All calls to one deployment go through one run(): its batch queue lives on that loop."""
    return asyncio.run(coro)


class SharedStore(LocalStore):
    """The in-process LRU, claiming to be shared (as Redis is) so the shared-cache paths run."""

    shared = True


def image(h=40, w=60, value=0) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


# --- fake engines ---------------------------------------------------------------------------


class FakeEncoder:
    def __init__(self, text=True):
        self.model_id, self.spec = SAM_ID, SPEC
        self.text = TextInfo(TEXT_ID, 32) if text else None
        self.calls: list[int] = []
        self.warmed = 0

    def warmup(self):
        self.warmed += 1

    def weights(self):
        return {"sam.image_encoder": 123}

    def embed_rgb(self, rgbs):
        self.calls.append(len(rgbs))
        g = SPEC.embedding_size
        return [ImageEmbedding(torch.full((1, SPEC.prompt_dim, g, g), float(rgb.mean())),
                               rgb.shape[:2], rgb.shape[:2], SAM_ID,
                               torch.zeros(1, 3, 32, 32) if self.text else None)
                for rgb in rgbs]


def square(h, w, cx, cy, r):
    m = np.zeros((h, w), dtype=bool)
    m[max(0, cy - r): cy + r, max(0, cx - r): cx + r] = True
    return m


class FakeDecoder:
    """Three nested squares around the first point: part (r=2), object (r=6), whole (r=12)."""

    def __init__(self):
        self.model_id = SAM_ID
        self.calls: list[tuple[str, int]] = []

    def weights(self):
        return {"sam.prompt_encoder": 1, "sam.mask_decoder": 2}

    def decode_points(self, emb, prompts):
        self.calls.append((emb.image_id, len(prompts)))
        h, w = emb.original_size
        out = []
        for p in prompts:
            cx, cy = (int(v) for v in p.points[0])
            masks = np.stack([square(h, w, cx, cy, r) for r in (2, 6, 12)])
            out.append(PointCandidates(masks, np.array([0.9, 0.5, 0.3]), None))
        return out


class FakeText:
    """'object' draws the middle square around the image centre; 'bad' is refused."""

    def __init__(self):
        self.model_id, self.sam_model_id = TEXT_ID, SAM_ID
        self.calls: list[list[str]] = []

    def validate(self, text):
        if text.strip() == "bad":
            raise InvalidPromptError("text 'bad' is refused by the fake")
        return text.strip()

    def text_masks(self, embs, texts):
        self.calls.append(list(texts))
        out = []
        for e, _ in zip(embs, texts, strict=True):
            h, w = e.original_size
            out.append(square(h, w, w // 2, h // 2, 6))
        return out


# --- ImageEncoder ---------------------------------------------------------------------------


def test_encoder_batches_concurrent_images_and_encodes_each_once(replica):
    engine = FakeEncoder()
    dep = ImageEncoder(ARGS, engine=engine)
    assert engine.warmed == 1  # warmed before it takes traffic
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    imgs = [image(value=v) for v in (10, 20, 10)]
    ids = ["a" * 64, "b" * 64, "a" * 64]  # the third repeats the first

    async def go():
        return await asyncio.gather(*[dep(im, i) for im, i in zip(imgs, ids, strict=True)])

    blobs = run(go())
    assert engine.calls == [2]  # one batch, the repeated image encoded once
    emb = unpack_embedding(blobs[0], SAM_ID)
    assert emb.image_id == ids[0] and emb.original_size == (40, 60)
    assert blobs[0] == blobs[2]
    stats = dep.stats()
    assert stats["images"] == 2 and stats["batches"] == 1 and stats["requests"] == 3
    assert stats["weights"] == {"sam.image_encoder": 123}
    assert stats["process"]["vmhwm_mb"] > 0 and stats["process"]["ready_s"] >= 0
    assert dep.info() == {"model": {"sam": SAM_ID, "text": TEXT_ID,
                                    "reference": "vrp-tiny:random-0"},  # the tiny profile's
                          "sam_variant": "tiny", "image_size": SPEC.img_size, "text_model": True,
                          "reference_model": True}


def test_encoder_with_a_shared_cache_writes_and_reuses_embeddings(replica):
    engine, store = FakeEncoder(text=False), SharedStore()
    dep = ImageEncoder(ARGS, engine=engine, cache=Cached(store))
    img_id = "c" * 64
    key = embedding_key(SAM_ID, img_id)

    async def go():
        first = await dep(image(), img_id)
        stored = await store.get(key)  # written by the encoder
        again = await dep(image(), img_id)
        # resent by value (a replica could not read the cache): the bytes, cached or encoded
        by_value = [await dep(image(), img_id, True), await dep(image(), "f" * 64, True)]
        return first, stored, again, by_value, await store.get(embedding_key(SAM_ID, "f" * 64))

    first, stored, again, (cached, fresh), fresh_stored = run(go())
    # stored: the answer names it (a ref with its header), the value stays in the cache
    assert isinstance(first, EmbeddingRef) and first.key == key
    assert first.header == embedding_header(stored) and first.image_id == img_id
    assert again == EmbeddingRef(key, {**first.header, "original_size": [40, 60],
                                       "input_size": first.header["input_size"]})
    assert engine.calls == [1, 1] and dep.stats()["shared_cache_hits"] == 2
    assert unpack_embedding(stored, SAM_ID).original_size == (40, 60)
    assert cached == stored and isinstance(fresh, bytes) and fresh_stored == fresh
    assert dep.info()["text_model"] is False


def test_encoder_answers_the_value_when_the_shared_cache_cannot_store_it(replica):
    class Refusing(SharedStore):
        async def set(self, key, value, ttl_s=None):
            return False  # as RedisStore.set when Redis is down

    engine = FakeEncoder(text=False)
    dep = ImageEncoder(ARGS, engine=engine, cache=Cached(Refusing()))
    out = run(dep(image(), "e" * 64))
    assert isinstance(out, bytes) and unpack_embedding(out, SAM_ID).original_size == (40, 60)


# --- PointDecoder ---------------------------------------------------------------------------


def encoded(value=0, img_id="d" * 64, h=40, w=60) -> bytes:
    from biprompt.cache import pack_embedding

    emb = FakeEncoder().embed_rgb([image(h, w, value)])[0]
    emb.image_id = img_id
    return pack_embedding(emb)


def prompt(x, y, text=None, mode="biprompt"):
    from biprompt.prompts import make_prompt

    return make_prompt((40, 60), [[x, y]], text=text, mode=mode)


def test_decoder_decodes_prompts_on_one_image_together(replica):
    engine = FakeDecoder()
    dep = PointDecoder(ARGS, engine=engine)
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    a, b = encoded(1, "a" * 64), encoded(2, "b" * 64)

    async def go():
        return await asyncio.gather(dep(a, prompt(10, 10)), dep(b, prompt(20, 20)),
                                    dep(a, prompt(30, 12)))

    out = run(go())
    assert sorted(engine.calls) == [("a" * 64, 2), ("b" * 64, 1)]  # one call per image
    masks = unpack_bits(out[2]["masks"])
    assert masks.shape == (3, 40, 60) and masks[1, 12, 30] and not masks[1, 0, 0]
    np.testing.assert_allclose(out[0]["scores"], [0.9, 0.5, 0.3])
    assert dep.stats()["batches"] == 1 and dep.stats()["prompts"] == 3


def test_decoder_refuses_an_embedding_of_another_model(replica):
    from biprompt.cache import CacheFormatError
    from biprompt.engines import PointDecoderEngine
    from biprompt.errors import InvalidImageError
    from biprompt.factory import load_sam_part, open_sam

    src = open_sam(None, "tiny")
    real = PointDecoderEngine(load_sam_part(src, "prompt_encoder"),
                              load_sam_part(src, "mask_decoder"), src.spec, src.model_id)
    dep = PointDecoder(ARGS, engine=real)
    assert set(dep.stats()["weights"]) == {"sam.prompt_encoder", "sam.mask_decoder"}
    decoder = dep.stats()["decoder"]  # warmed up in the constructor: the batching was measured
    assert decoder["backend"] == "torch" and decoder["batching"]["measured"]
    assert decoder["batching"]["mode"] in ("batched", "looped")
    with pytest.raises(CacheFormatError, match="made by sam-tiny:fake"):
        run(dep(encoded(), prompt(5, 5)))  # made by SAM_ID, not the real tiny model
    emb = FakeEncoder().embed_rgb([image()])[0]
    with pytest.raises(InvalidImageError, match="embedding was made by"):
        real.decode_points(emb, [prompt(5, 5)])


# --- TextMask -------------------------------------------------------------------------------


def test_text_bad_item_fails_alone_and_masks_are_cached(replica):
    engine, store = FakeText(), SharedStore()
    dep = TextMask(ARGS, engine=engine, cache=Cached(store))
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    blob = encoded()

    async def go():
        return await asyncio.gather(dep(blob, "the object", "k1"), dep(blob, "bad", "k2"),
                                    dep(blob, " the thing ", "k3"), return_exceptions=True)

    ok1, bad, ok2 = run(go())
    assert isinstance(bad, InvalidPromptError)
    assert engine.calls == [["the object", "the thing"]]  # one batch, without the bad text
    for ok, key in ((ok1, "k1"), (ok2, "k3")):
        mask = unpack_bits(ok["mask"])
        assert mask.shape == (40, 60) and mask[20, 30]
        rle = unpack_mask_rle(run(store.get(key)), TEXT_ID)  # cached as COCO RLE
        np.testing.assert_array_equal(unpack_bits({"rle": [rle], "shape": (40, 60)}), mask)
    assert run(store.get("k2")) is None


def test_text_deployment_without_a_text_model_says_so(replica, tmp_path):
    profile = tmp_path / "points.yaml"
    profile.write_text("name: points\nsam: {variant: tiny}\ndevice: cpu\n")
    dep = TextMask(ARGS.model_copy(update={"model_profile": str(profile)}))
    assert dep.engine is None and dep.stats()["weights"] == {}
    with pytest.raises(InvalidPromptError, match="no text model"):
        run(dep(encoded(), "the object"))


# --- Selector -------------------------------------------------------------------------------


def decoded(x=30, y=20) -> dict:
    c = FakeDecoder().decode_points(SimpleNamespace(image_id="x", original_size=(40, 60)),
                                    [SimpleNamespace(points=np.array([[x, y]]))])[0]
    from deployments.common import pack_bits

    return {"masks": pack_bits(c.masks), "scores": c.scores, "decoder_ms": 1.0}


def spec(mode="biprompt", fmt="none", **kw):
    return {"mode": mode, "mask_format": fmt, "return_candidates": False,
            "return_text_mask": False, **kw}


def test_selector_picks_what_the_text_agrees_with():
    from deployments.common import pack_bits

    sel = Selector(ARGS)
    text = {"mask": pack_bits(square(40, 60, 30, 20, 6)), "text_ms": 2.0}
    out = run(sel(decoded(), spec(), text=text))
    assert out["selected"] == 1 and out["strategy"] == "biprompt" and out["agreement"] == 1.0
    assert [c["text_iou"] for c in out["candidates"]][1] == 1.0
    assert out["timings_ms"]["text_model"] == 2.0 and out["timings_ms"]["point_decoder"] == 1.0
    point = run(sel(decoded(), spec(mode="point"), text=text))
    assert point["selected"] == 0 and point["strategy"] == "point"
    alone = run(sel(None, spec(mode="text", fmt="rle"), text=square(40, 60, 30, 20, 6)))
    assert alone["selected"] is None and alone["strategy"] == "text" and alone["mask"]["size"] == [40, 60]
    assert run(sel(decoded(), spec(), text=None))["strategy"] == "fallback_no_text"
    assert run(sel(decoded(), spec()))["strategy"] == "fallback_no_text"  # no expert asked
    assert sel.stats()["weights"] == {}


@pytest.mark.parametrize("bias, expected", [(1.0, 1), (-1.0, 2)])
def test_selector_serves_the_profiles_arbiter(tmp_path, bias, expected):
    """A profile with `selection.rule: arbiter`: the Selector loads its arbiter file and, where
    the text and the reference pick different candidates, takes the pick the arbiter prefers."""
    from biprompt.arbiter import FEATURES, Arbiter
    from deployments.common import pack_bits, unpack_bits

    n = len(FEATURES)
    Arbiter(("text", "reference"), (0.0,) * n, (1.0,) * n, (0.0,) * n, bias).save(
        tmp_path / "arbiter.json")
    profile = tmp_path / "p.yaml"
    tiny = Path("configs/models/tiny.yaml").read_text()
    block = "selection:\n  agreement_threshold: 0.1\n"
    assert block in tiny
    profile.write_text(tiny.replace(block, block + "  rule: arbiter\n  arbiter: ./arbiter.json\n"))
    sel = Selector(ARGS.model_copy(update={"model_profile": str(profile)}))
    assert sel.rule == "arbiter" and sel.arbiter.bias == bias
    cands = unpack_bits(decoded()["masks"])
    experts = {"text": {"mask": pack_bits(cands[1]), "text_ms": 1.0},
               "reference": {"mask": pack_bits(cands[2]), "reference_ms": 1.0}}
    out = run(sel(decoded(), spec(), **experts))
    assert (out["selected"], out["strategy"]) == (expected, "biprompt")
    assert out["agreement"] == 1.0  # the chosen pick is one expert's own mask


# --- Ingress --------------------------------------------------------------------------------


class FakeHandle:
    """A deployment handle over an object in this process: `.remote()` schedules the call and
    resolves awaitable arguments first, as Serve does with DeploymentResponses."""

    def __init__(self, target, method: str | None = None):
        self.target, self.method = target, method

    def __getattr__(self, name):
        return FakeHandle(self.target, name)

    def remote(self, *args, **kwargs):
        fn = self.target if self.method is None else getattr(self.target, self.method)

        async def call():
            resolved = [await a if inspect.isawaitable(a) else a for a in args]
            named = {k: await v if inspect.isawaitable(v) else v for k, v in kwargs.items()}
            out = fn(*resolved, **named)
            return await out if inspect.isawaitable(out) else out

        return asyncio.ensure_future(call())


def ingress_class():
    """The Ingress class as written, under serve.ingress's ASGI wrapper."""
    return next(c for c in ingress_module.Ingress.__mro__
                if c.__name__ == "Ingress" and "__init__" in c.__dict__
                and not inspect.iscoroutinefunction(c.__dict__["__init__"]))


def make_ingress():
    enc, dec, txt = FakeEncoder(), FakeDecoder(), FakeText()
    deps = (ImageEncoder(ARGS, engine=enc), PointDecoder(ARGS, engine=dec),
            TextMask(ARGS, engine=txt), Selector(ARGS))
    ing = ingress_class()(*[FakeHandle(d) for d in deps], ARGS)
    return ing, enc, dec, txt


def png(h=40, w=60, value=7) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image(h, w, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_ingress_fans_out_once_per_image_and_serves_clicks_from_the_cache(replica):
    ing, enc, dec, txt = make_ingress()
    data = png()
    req = SegmentRequest(image=data, points=[[30, 20]], text="the object")

    async def go():
        first = await asyncio.gather(ing.segment_one(req, "r1"), ing.segment_one(req, "r2"))
        for _ in range(1000):  # the single-flight entry settles into the cache
            if not ing._inflight:
                break
            await asyncio.sleep(0)
        assert not ing._inflight
        later = await ing.segment_one(SegmentRequest(image_id=image_id(data), points=[[10, 10]],
                                                     mode="point"), "r3")
        with pytest.raises(NotFoundError, match="unknown image_id"):
            await ing.segment_one(SegmentRequest(image_id="e" * 64, points=[[1, 1]]), "r4")
        return first, later

    (a, b), later = run(go())
    assert enc.calls == [1]  # two concurrent requests, one encoder pass
    assert a["cache"] == "miss" and a["selected"] == 1 and a["strategy"] == "biprompt"
    assert b["image_id"] == a["image_id"] == image_id(data)
    assert later["cache"] == "hit" and later["strategy"] == "point" and later["text_cache"] is None
    assert txt.calls == [["the object"]]  # the same new (image, text) twice: one pair run
    assert (a["width"], a["height"]) == (60, 40)
    assert ing.stats()["weights"] == {} and ing.stats()["process"]["pid"] > 0


# --- failure isolation: one bad item fails alone ----------------------------------------------


class PoisonError(ValueError):
    pass


def test_encoder_image_that_breaks_its_batch_fails_alone(replica):
    engine = FakeEncoder()
    embed = engine.embed_rgb

    def embed_or_raise(rgbs):  # as PIL's resize did for a 4000x3 image: the whole call raises
        if any(rgb.mean() == 99 for rgb in rgbs):
            engine.calls.append(len(rgbs))
            raise PoisonError("height and width must be > 0")
        return embed(rgbs)

    engine.embed_rgb = embed_or_raise
    dep = ImageEncoder(ARGS, engine=engine)
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    values, ids = (10, 99, 20, 99), ["a" * 64, "b" * 64, "c" * 64, "b" * 64]

    async def go():
        calls = [dep(image(value=v), i) for v, i in zip(values, ids, strict=True)]
        return await asyncio.gather(*calls, return_exceptions=True)

    ok1, bad, ok2, bad_again = run(go())
    assert isinstance(bad, PoisonError) and bad_again is bad  # its own error, to both callers
    assert unpack_embedding(ok1, SAM_ID).image_id == "a" * 64
    assert unpack_embedding(ok2, SAM_ID).image_id == "c" * 64
    assert engine.calls == [3, 1, 1, 1]  # the batch, then each of its 3 images alone
    stats = dep.stats()
    assert (stats["batches"], stats["images"], stats["failed"]) == (1, 2, 1)


def test_decoder_prompt_or_embedding_that_fails_fails_alone(replica):
    engine = FakeDecoder()
    decode = engine.decode_points

    def decode_or_raise(emb, prompts):
        if any(int(p.points[0][0]) == 59 for p in prompts):
            raise PoisonError("this click breaks the decoder")
        return decode(emb, prompts)

    engine.decode_points = decode_or_raise
    dep = PointDecoder(ARGS, engine=engine)
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    a, b, c = encoded(1, "a" * 64), encoded(2, "b" * 64), encoded(3, "c" * 64)
    corrupt = c[: len(c) // 2]  # its header reads, its embedding doesn't

    async def go():
        return await asyncio.gather(dep(a, prompt(10, 10)), dep(a, prompt(59, 10)),
                                    dep(b, prompt(20, 20)), dep(corrupt, prompt(5, 5)),
                                    dep(a, prompt(30, 12)), return_exceptions=True)

    ok_a1, bad, ok_b, broken, ok_a2 = run(go())
    assert isinstance(bad, PoisonError) and isinstance(broken, Exception)
    assert not isinstance(broken, PoisonError)
    for ok, (x, y) in ((ok_a1, (10, 10)), (ok_b, (20, 20)), (ok_a2, (30, 12))):
        assert unpack_bits(ok["masks"])[1, y, x] and ok["decoder_ms"] >= 0
    stats = dep.stats()
    assert (stats["batches"], stats["prompts"], stats["failed"]) == (1, 3, 2)


def test_text_pair_that_breaks_its_batch_fails_alone(replica):
    engine = FakeText()
    masks = engine.text_masks

    def masks_or_raise(embs, texts):
        if "the poison" in texts:
            engine.calls.append(list(texts))
            raise PoisonError("BEiT-3 choked on it")
        return masks(embs, texts)

    engine.text_masks = masks_or_raise
    dep = TextMask(ARGS, engine=engine)
    dep.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    blob, other = encoded(1, "a" * 64), encoded(2, "b" * 64)

    async def go():
        return await asyncio.gather(dep(blob, "the object"), dep(blob, "the poison"),
                                    dep(other, "the object"), dep(b"not an embedding", "x"),
                                    return_exceptions=True)

    ok1, bad, ok2, broken = run(go())
    assert isinstance(bad, PoisonError) and isinstance(broken, Exception)
    assert not isinstance(broken, PoisonError)
    for ok in (ok1, ok2):
        assert unpack_bits(ok["mask"])[20, 30]
    # the unreadable item never reached the model; the batch of 3 did, then each pair alone
    assert engine.calls == [["the object", "the poison", "the object"], ["the object"],
                            ["the poison"], ["the object"]]
    stats = dep.stats()
    assert (stats["batches"], stats["pairs"], stats["failed"]) == (1, 2, 2)


# --- a replica that dies mid-request: 503, and one retry in the Ingress -----------------------


def test_replica_death_is_overloaded_with_retry_after():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import DeploymentUnavailableError, RayServeException

    from biprompt.errors import OverloadedError
    from deployments.http import as_api_error, error_response

    # what Serve 2.60 raised in the Ingress when the ImageEncoder's replica was killed: the
    # DeploymentResponse passed on to the PointDecoder failed while it was resolved
    wrapped = RayTaskError("__call__", "traceback", ActorDiedError()).as_instanceof_cause()
    upstream = RayServeException("Request to deployment 'PointDecoder' failed because an "
                                 "upstream actor died before finishing a dependent task.")
    upstream.__cause__ = wrapped
    for exc in (ActorDiedError(), ActorUnavailableError("gone", None), upstream, wrapped,
                DeploymentUnavailableError("ImageEncoder")):
        err = as_api_error(exc)
        assert isinstance(err, OverloadedError) and err.status_code == 503, exc
        assert err.retry_after_s >= 1
    resp = error_response(SimpleNamespace(state=SimpleNamespace(request_id="r"),
                                          headers={"accept": "application/json"}),
                          as_api_error(upstream))
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert "ActorDiedError" in resp.body.decode()
    assert as_api_error(RayServeException("some other failure")).status_code == 500


class DyingHandle(FakeHandle):
    """A handle whose first `deaths` calls fail as a killed replica's do."""

    def __init__(self, target, deaths: int, method: str | None = None, log=None):
        super().__init__(target, method)
        self.deaths, self.log = [deaths], log if log is not None else []

    def __getattr__(self, name):
        h = DyingHandle(self.target, 0, name, self.log)
        h.deaths = self.deaths
        return h

    def remote(self, *args, **kwargs):
        from ray.exceptions import ActorDiedError

        self.log.append(self.method)
        if self.method is None and self.deaths[0] > 0:
            self.deaths[0] -= 1

            async def die():
                await asyncio.sleep(0.01)
                raise ActorDiedError()

            return asyncio.ensure_future(die())
        return super().remote(*args, **kwargs)


def make_dying_ingress(encoder_deaths=0, text_deaths=0):
    enc, dec, txt = FakeEncoder(), FakeDecoder(), FakeText()
    encoder = DyingHandle(ImageEncoder(ARGS, engine=enc), encoder_deaths)
    text = DyingHandle(TextMask(ARGS, engine=txt), text_deaths)
    ing = ingress_class()(encoder, FakeHandle(PointDecoder(ARGS, engine=dec)), text,
                          FakeHandle(Selector(ARGS)), ARGS)
    return ing, encoder, text, enc


@pytest.mark.parametrize("which", ["encoder", "text"])
def test_ingress_retries_once_when_a_replica_dies(replica, which):
    ing, encoder, text, enc = make_dying_ingress(**{f"{which}_deaths": 1})
    req = SegmentRequest(image=png(), points=[[30, 20]], text="the object")

    async def go():
        # two concurrent requests share the failed encoder call; both retry, sharing a fresh one
        return await asyncio.gather(ing.segment_one(req, "r1"), ing.segment_one(req, "r2"))

    a, b = run(go())
    assert a["strategy"] == b["strategy"] == "biprompt" and a["selected"] == 1
    assert enc.calls == [1]  # the fresh encoder call ran once, for both retries
    calls = encoder.log if which == "encoder" else text.log
    assert calls.count(None) >= 2  # the failed call and the retry's


def test_ingress_answers_503_when_the_retry_fails_too(replica):
    from biprompt.errors import OverloadedError

    ing, *_ = make_dying_ingress(encoder_deaths=2)
    req = SegmentRequest(image=png(), points=[[30, 20]], mode="point")

    async def go():
        with pytest.raises(OverloadedError, match="replica went away"):
            await ing._guard(ing.segment_one(req, "r1"))
        return await ing.segment_one(req, "r2")  # the deaths are over: a fresh encoder call

    assert run(go())["strategy"] == "point"
    assert not ing._inflight


def test_the_decoder_reads_a_cached_expert_mask_by_its_key(replica):
    """A text mask the Ingress saw cached comes as a CachedMask: the PointDecoder reads it from
    the cache, and joins exactly as with the mask itself; once gone, EmbeddingUnavailable (the
    Ingress then sends it by value)."""
    from biprompt.cache import pack_mask_rle
    from deployments.common import pack_rle
    from deployments.embeddings import CachedMask, EmbeddingUnavailable

    dep = PointDecoder(ARGS, engine=FakeDecoder())
    text = np.zeros((40, 60), bool)
    text[10:30, 20:40] = True
    packed = pack_rle(text)
    key = "biprompt:test:txr:key"

    async def go():
        await dep.cache.store.set(key, pack_mask_rle(packed["rle"][0], TEXT_ID))
        by_value = await dep(encoded(1, "a" * 64), prompt(30, 20), False,
                             {"spec": spec(), "experts": {"text": packed}})
        by_key = await dep(encoded(1, "a" * 64), prompt(30, 20), False,
                           {"spec": spec(), "experts": {"text": CachedMask(key, TEXT_ID)}})
        await dep.cache.store.delete(key)
        with pytest.raises(EmbeddingUnavailable, match="cached text mask"):
            await dep(encoded(1, "a" * 64), prompt(30, 20), False,
                      {"spec": spec(), "experts": {"text": CachedMask(key, TEXT_ID)}})
        return by_value["joined"], by_key["joined"]

    a, b = run(go())
    a.pop("timings_ms"), b.pop("timings_ms")
    assert a == b and a["candidates"][0]["expert_ious"]["text"] is not None

"""The embedding / text-mask cache: value codec, keys, the two stores and typed access."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time

import msgpack
import numpy as np
import pytest
import torch

from biprompt import cache as cache_module
from biprompt.cache import (
    _PREFIX,
    FORMAT_VERSION,
    MAGIC,
    Cached,
    CacheFormatError,
    LocalStore,
    RedisStore,
    embedding_header,
    embedding_key,
    image_id,
    make_store,
    pack,
    pack_embedding,
    pack_mask,
    text_mask_key,
    unpack_embedding,
    unpack_mask,
)
from biprompt.preprocess import PREPROCESS_VERSION
from biprompt.types import ImageEmbedding
from tests.support.redis_server import RedisServer, free_port

MODEL = "sam-tiny"


def make_emb(beit: bool = True, seed: int = 0) -> ImageEmbedding:
    g = torch.Generator().manual_seed(seed)
    return ImageEmbedding(
        embedding=torch.randn(1, 8, 4, 4, generator=g) * 3,
        original_size=(240, 320), input_size=(48, 64), model_id=MODEL,
        beit_image=torch.randn(1, 3, 16, 16, generator=g) if beit else None,
        image_id="ab" * 32,
    )


def craft(header: dict, body: bytes = b"") -> bytes:
    """A value with a hand-written header: well formed at the byte level."""
    raw = msgpack.packb(header)
    return _PREFIX.pack(MAGIC, len(raw)) + raw + body


def spec(name: str, dtype: str, shape: list[int], nbytes: int, offset: int = 0) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}


def recorder():
    """-> (events, observer). The observer is a function: an empty list would be falsy."""
    events: list[tuple[str, str]] = []
    return events, lambda what, outcome: events.append((what, outcome))


class FakeTime:
    """Stands in for the `time` module inside biprompt.cache: `monotonic()` is `now`, moved by
    the test, so TTLs and cool-downs expire when the test says, however slow the machine."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(cache_module, "time", fake)
    return fake


def sync(test):
    """Run an async test body with asyncio.run (no pytest-asyncio)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


# --- values ---------------------------------------------------------------------------------


def test_embedding_round_trip_float16():
    emb = make_emb()
    out = unpack_embedding(pack_embedding(emb), MODEL)
    assert out.embedding.dtype == torch.float16
    assert torch.equal(out.embedding.float(), emb.embedding.half().float())
    assert out.beit_image.dtype == torch.float32 and torch.equal(out.beit_image, emb.beit_image)
    assert (out.original_size, out.input_size) == ((240, 320), (48, 64))
    assert (out.model_id, out.image_id) == (MODEL, emb.image_id)


def test_embedding_round_trip_float32_is_bit_exact_and_beit_optional():
    emb = make_emb(beit=False)
    blob = pack_embedding(emb, dtype="float32")
    out = unpack_embedding(blob)
    assert out.embedding.dtype == torch.float32 and torch.equal(out.embedding, emb.embedding)
    assert out.beit_image is None
    header = embedding_header(blob)
    assert header["original_size"] == [240, 320] and header["model_id"] == MODEL


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (240, 320)])
def test_mask_round_trip(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) > 0.5
    out = unpack_mask(pack_mask(mask, "evf"), "evf")
    assert out.dtype == bool and out.shape == shape
    np.testing.assert_array_equal(out, mask)


def _corrupt_values() -> dict[str, bytes]:
    good = pack_embedding(make_emb())
    header_end = _PREFIX.size + _PREFIX.unpack_from(good)[1]
    emb_spec = spec("embedding", "float32", [1, 2, 2, 2], 32)
    meta = {"model_id": MODEL, "original_size": [4, 4], "input_size": [4, 4]}
    cuts = {"cut_magic": 1, "cut_length": 4, "cut_prefix": 7, "cut_header": header_end - 3,
            "cut_body_start": header_end, "cut_last_byte": len(good) - 1}
    values = {name: good[:n] for name, n in cuts.items()}
    values.update({
        "empty": b"",
        "magic": b"XPC1" + good[4:],
        "version": craft({"v": FORMAT_VERSION + 1, "kind": "embedding", "arrays": []}),
        "kind": craft({"v": FORMAT_VERSION, "kind": "mask", "arrays": [emb_spec], **meta},
                      bytes(32)),
        "nbytes": craft({"v": FORMAT_VERSION, "kind": "embedding",
                         "arrays": [spec("embedding", "float32", [1, 2, 2, 2], 28)], **meta},
                        bytes(28)),
        "trailing": good + b"\0",
        "not_a_dict": craft([1, 2, 3]),  # type: ignore[arg-type]
        "missing_sizes": craft({"v": FORMAT_VERSION, "kind": "embedding", "arrays": [emb_spec],
                                "model_id": MODEL}, bytes(32)),
    })
    rng = np.random.default_rng(0)
    for n in (3, 8, 64, 4096):
        values[f"random{n}"] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return values


CORRUPT = _corrupt_values()
HEADER_INTACT = {"cut_body_start", "cut_last_byte", "nbytes", "trailing", "missing_sizes"}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_values_are_cache_format_errors(name):
    blob = CORRUPT[name]
    with pytest.raises(CacheFormatError):
        unpack_embedding(blob, MODEL)
    with pytest.raises(CacheFormatError):
        unpack_mask(blob, MODEL)
    if name not in HEADER_INTACT:
        with pytest.raises(CacheFormatError):
            embedding_header(blob)


def test_bad_mask_values_are_cache_format_errors():
    good = pack_mask(np.ones((3, 5), bool), "evf")
    bad = [
        pack("mask", {"bits": np.zeros(2, np.float32)}, shape=[3, 5], model_id="evf"),
        pack("mask", {"bits": np.zeros(1, np.uint8)}, shape=[3, 5], model_id="evf"),
        pack("mask", {"bits": np.zeros(2, np.uint8)}, shape=[15], model_id="evf"),
        pack("mask", {"bits": np.zeros(2, np.uint8)}, shape=["a", "b"], model_id="evf"),
        pack("mask", {}, shape=[3, 5], model_id="evf"),
    ]
    for blob in [*bad, good + b"\0"]:
        with pytest.raises(CacheFormatError):
            unpack_mask(blob, "evf")


def test_model_id_mismatch_is_cache_format_error():
    with pytest.raises(CacheFormatError, match="other"):
        unpack_embedding(pack_embedding(make_emb()), "other")
    with pytest.raises(CacheFormatError, match="other"):
        unpack_mask(pack_mask(np.ones((2, 2), bool), "evf"), "other")


# --- keys -----------------------------------------------------------------------------------


def test_embedding_key():
    key = embedding_key("sam-a", "img1")
    assert f"p{PREPROCESS_VERSION}" in key and key == embedding_key("sam-a", "img1")
    assert len({key, embedding_key("sam-b", "img1"), embedding_key("sam-a", "img2")}) == 3


def test_text_mask_key():
    key = text_mask_key("sam", "evf", "img", "a b")
    assert key == text_mask_key("sam", "evf", "img", " a b \n")
    others = [text_mask_key("sam", "evf", "img", "a c"), text_mask_key("sam", "evf2", "img", "a b"),
              text_mask_key("sam2", "evf", "img", "a b"), text_mask_key("sam", "evf", "im2", "a b")]
    assert len({key, *others}) == 5


def test_image_id_is_sha256_hex():
    data = b"\x89PNG not really"
    assert image_id(data) == hashlib.sha256(data).hexdigest()
    assert image_id(data) != image_id(data + b"!")


# --- LocalStore -----------------------------------------------------------------------------


@sync
async def test_local_store_lru_by_bytes():
    store = LocalStore(max_bytes=30, ttl_s=None)
    for k in "abc":
        await store.set(k, k.encode() * 10)
    assert await store.get("a") == b"a" * 10  # refreshes a: b is now the oldest
    await store.set("d", b"d" * 10)
    assert await store.get("b") is None
    for k in "acd":
        assert await store.get(k) == k.encode() * 10
    assert store._bytes == 30


@sync
async def test_local_store_skips_values_larger_than_budget():
    store = LocalStore(max_bytes=10)
    await store.set("small", b"s" * 10)
    await store.set("big", b"b" * 11)
    assert await store.get("big") is None
    assert await store.get("small") == b"s" * 10 and store._bytes == 10


@sync
async def test_local_store_ttl_expiry(clock):
    store = LocalStore(ttl_s=60)
    await store.set("k", b"v")
    clock.now += 59.9
    assert await store.get("k") == b"v"
    clock.now += 0.2
    assert await store.get("k") is None and store._bytes == 0


@sync
async def test_local_store_delete_and_overwrite():
    store = LocalStore(max_bytes=20)
    await store.set("a", b"x" * 10)
    await store.set("a", b"y" * 10)  # overwrite: still 10 bytes, so b fits beside it
    await store.set("b", b"z" * 10)
    assert store._bytes == 20
    assert (await store.get("a"), await store.get("b")) == (b"y" * 10, b"z" * 10)
    await store.delete("b")
    await store.delete("missing")
    assert await store.get("b") is None and store._bytes == 10


# --- RedisStore -----------------------------------------------------------------------------


@sync
async def test_redis_round_trip_and_ttl(redis_server):
    store = RedisStore(redis_server.url, ttl_s=100)
    await store.set("k", b"\0value")
    assert await store.get("k") == b"\0value" and await store.get("missing") is None
    assert 0 < redis_server.client().ttl("k") <= 100
    await store._client.aclose()


@sync
async def test_redis_down_is_a_fast_miss_and_caching_resumes(redis_server, clock):
    events, observer = recorder()
    store = RedisStore(redis_server.url, cooldown_s=2.0, observer=observer)
    await store.set("k", b"v")
    assert await store.get("k") == b"v"
    redis_server.kill()
    assert [await store.get("k") for _ in range(5)] == [None] * 5
    # one failed attempt, then no network at all while it cools down (the clock stands still)
    assert events == [("redis", "error")] + [("redis", "skipped")] * 4

    revived = RedisServer(port=redis_server.port).start()
    try:
        clock.now += 1.9
        assert await store.get("k") is None and events[-1] == ("redis", "skipped")
        clock.now += 0.2  # past the cool-down
        await store.set("k2", b"again")
        assert await store.get("k2") == b"again"
        assert revived.client().get("k2") == b"again"
    finally:
        await store._client.aclose()
        revived.kill()


@sync
async def test_redis_restart_leaves_no_stale_pooled_connections(redis_server, clock):
    """Connections pooled before a restart are dead after it: the first failure drops them all,
    so concurrent requests after the cool-down all reach the new server."""
    events, observer = recorder()
    store = RedisStore(redis_server.url, cooldown_s=1.0, observer=observer)
    await store.set("k", b"v")
    assert await asyncio.gather(*[store.get("k") for _ in range(8)]) == [b"v"] * 8  # 8 in the pool
    redis_server.kill()
    revived = RedisServer(port=redis_server.port).start()
    try:
        revived.client().set("k", b"w")
        assert await store.get("k") is None and events[-1] == ("redis", "error")  # one stale
        clock.now += 1.1
        events.clear()
        assert await asyncio.gather(*[store.get("k") for _ in range(8)]) == [b"w"] * 8
        assert events == []
    finally:
        await store._client.aclose()
        revived.kill()


@sync
async def test_redis_nothing_listening():
    events, observer = recorder()
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", observer=observer)
    await store.set("k", b"v")
    assert await store.get("k") is None
    assert ("redis", "error") in events


# --- Cached ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["good", "garbage", "other_model", None])
@sync
async def test_cached_embedding_blob(stored):
    good = pack_embedding(make_emb())
    value = {"good": good, "garbage": b"BPC1 garbage", None: None,
             "other_model": good.replace(MODEL.encode(), b"sam-xxxx")}[stored]
    store, (events, observer) = LocalStore(), recorder()
    if value is not None:
        await store.set("k", value)
    got = await Cached(store, observer).get_embedding_blob("k", MODEL)
    if stored == "good":
        assert got == good and await store.get("k") == good
        assert events == [("embedding", "hit")]
    elif stored is None:
        assert got is None and events == [("embedding", "miss")]
    else:
        assert got is None and await store.get("k") is None
        assert events == [("embedding", "corrupt"), ("embedding", "miss")]


@pytest.mark.parametrize("stored", ["good", "garbage"])
@sync
async def test_cached_mask(stored):
    mask = np.eye(5, 7, dtype=bool)
    value = pack_mask(mask, "evf") if stored == "good" else b"\x00" * 40
    store, (events, observer) = LocalStore(), recorder()
    await store.set("k", value)
    got = await Cached(store, observer).get_mask("k", "evf")
    if stored == "good":
        np.testing.assert_array_equal(got, mask)
        assert await store.get("k") == value and events == [("text_mask", "hit")]
    else:
        assert got is None and await store.get("k") is None
        assert events == [("text_mask", "corrupt"), ("text_mask", "miss")]

# --- make_store -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "", "local"])
def test_make_store_local(url):
    store = make_store(url, ttl_s=5)
    assert isinstance(store, LocalStore) and store.ttl_s == 5


def test_make_store_redis_and_bad_url():
    store = make_store("redis://127.0.0.1:1/0")
    assert isinstance(store, RedisStore) and store.shared is True
    with pytest.raises(ValueError, match="redis://"):
        make_store("http://x")

"""The pieces behind 'embeddings stay put': reading an embedding's header without its arrays (and
catching a truncated value), text masks cached as COCO RLE, a replica's own LRU of embeddings,
masks between replicas as RLE, and the payload byte count."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from biprompt.cache import (
    Cached,
    CacheFormatError,
    LocalStore,
    pack_embedding,
    pack_mask_rle,
    unpack_mask_rle,
)
from biprompt.types import ImageEmbedding
from deployments.common import pack_bits, pack_rle, unpack_bits
from deployments.embeddings import (
    EmbeddingRef,
    EmbeddingUnavailable,
    ReplicaEmbeddings,
    payload_bytes,
)


def run(coro):
    return asyncio.run(coro)


def blob(img_id: str, model: str = "sam", side: int = 16) -> bytes:
    emb = ImageEmbedding(torch.randn(1, 8, side, side), (30, 40), (12, 16), model,
                         torch.zeros(1, 3, 4, 4))
    emb.image_id = img_id
    return pack_embedding(emb, encode_ms=5.0)


def test_the_header_is_read_without_the_arrays():
    store = LocalStore()
    value = blob("a")
    run(store.set("k", value))
    header = run(Cached(store).get_embedding_header("k", "sam"))
    assert header["original_size"] == [30, 40] and header["input_size"] == [12, 16]
    assert header["image_id"] == "a" and header["encode_ms"] == 5.0
    assert run(store.head("k", 8)) == (value[:8], len(value))
    assert run(Cached(store).get_embedding_header("missing", "sam")) is None


def test_a_long_header_is_read_in_a_second_read():
    store = LocalStore()
    run(store.set("k", blob("x" * 6000)))  # an image id longer than the first read
    assert run(Cached(store).get_embedding_header("k", "sam", first=64))["image_id"] == "x" * 6000


@pytest.mark.parametrize("damage", ["truncated", "padded", "other model", "garbage"])
def test_a_damaged_value_is_a_miss_and_is_dropped(damage):
    store, outcomes = LocalStore(), []
    value = blob("a")
    value = {"truncated": value[:-10], "padded": value + b"\0", "other model": blob("a", "sam2"),
             "garbage": b"\x00" * 40}[damage]
    run(store.set("k", value))
    cached = Cached(store, lambda what, outcome: outcomes.append(outcome))
    assert run(cached.get_embedding_header("k", "sam")) is None
    assert run(store.get("k")) is None and outcomes == ["corrupt", "miss"]


def test_text_masks_are_cached_as_rle():
    mask = np.zeros((500, 700), bool)
    mask[100:300, 50:600] = True
    rle = pack_rle(mask)["rle"][0]
    value = pack_mask_rle(rle, "evf")
    assert len(value) < 2048  # where packed bits are 500*700/8 = 43,750 bytes
    got = unpack_mask_rle(value, "evf")
    assert got["size"] == [500, 700]
    np.testing.assert_array_equal(unpack_bits({"rle": [got], "shape": (500, 700)}), mask)
    assert run(Cached(LocalStore()).get_mask_rle("none", "evf")) is None
    with pytest.raises(CacheFormatError):
        unpack_mask_rle(value, "another text model")
    broken = pack_mask_rle({"size": [2, 2], "counts": b"\xff\xff"}, "evf")
    with pytest.raises(CacheFormatError):
        unpack_mask_rle(broken, "evf")


@pytest.mark.parametrize("shape", [(3, 48, 64), (48, 64), (1, 5, 7)])
def test_rle_and_bits_carry_the_same_masks(shape):
    m = np.random.default_rng(0).random(shape) > 0.5
    np.testing.assert_array_equal(unpack_bits(pack_rle(m)), m)
    np.testing.assert_array_equal(unpack_bits(pack_bits(m)), m)


def test_an_object_mask_is_small_in_rle_at_any_size():
    yy, xx = np.mgrid[:1024, :1024]
    disk = ((yy - 500) ** 2 + (xx - 400) ** 2) < 200**2
    assert payload_bytes(pack_rle(disk)) < 2048 < payload_bytes(pack_bits(disk)) // 60


def test_a_replica_keeps_its_own_lru_and_says_when_it_cannot_read():
    store = LocalStore()
    for name in "abc":
        run(store.set(name, blob(name)))
    held = ReplicaEmbeddings(Cached(store), "sam", capacity=2)
    assert held.stats()["routing"] == "local"  # not in a Serve replica

    def get(key):
        return run(held.get(EmbeddingRef(key, {})))

    a = get("a")
    assert a.image_id == "a" and get("a") is a  # held: one read
    get("b")
    get("c")  # evicts a
    assert held.stats()["held"] == 2 and held.counts["loads"] == 3
    assert get("a") is not a and held.counts["loads"] == 4
    assert held.counts["load_bytes"] == 4 * len(blob("a"))
    # sent by value: read, not kept
    assert run(held.get(blob("z"))).image_id == "z" and held.counts["sent"] == 1
    with pytest.raises(EmbeddingUnavailable, match="not in the shared cache"):
        get("gone")
    run(store.set("bad", blob("bad", "sam2")))  # another model's: unreadable here
    with pytest.raises(EmbeddingUnavailable, match="unreadable"):
        get("bad")
    assert run(store.get("bad")) is None and held.counts["unavailable"] == 2


def test_payload_bytes():
    arr = np.zeros((4, 5), np.float32)
    assert payload_bytes(arr) == 80 and payload_bytes(torch.zeros(3, dtype=torch.float16)) == 6
    assert payload_bytes(b"abc") == 3 and payload_bytes("é") == 2 and payload_bytes(None) == 0
    assert payload_bytes({"a": arr, "b": [b"xy", 3]}) == 1 + 80 + 1 + 2 + 8
    ref = EmbeddingRef("key", {"image_id": "i"})
    assert payload_bytes(ref) == 3 + 8 + 1


@pytest.mark.parametrize("shape", [(480, 640), (1, 1), (0, 5), (7, 3)])
def test_the_server_writes_the_clients_rle(shape):
    """Answers' RLE comes from pycocotools' encoder; it must be the light client's string."""
    from biprompt_client import rle

    from deployments.selector import encode_mask

    m = np.random.default_rng(1).random(shape) > 0.4
    assert encode_mask(m, "rle") == rle.encode(m)

"""Embeddings stay where they are used.

With a shared cache (Redis) the Ingress never moves an image embedding: it reads only the cached
value's header (sizes, ids: a few hundred bytes of a 2 MB value at ViT-H scale) and sends the
model replicas an `EmbeddingRef`, routed with Serve's model multiplexing keyed by the embedding's
cache key, so every click on an image goes to the replica that already holds its embedding. Each
PointDecoder and TextMask replica keeps the embeddings it was asked about in an LRU of its own
(`ReplicaEmbeddings`: Serve's multiplexed loader in a replica, a plain LRU elsewhere), filled from
Redis on a miss. The ImageEncoder answers a ref too once its own write to Redis succeeded. A
cached expert mask goes the same way (`CachedMask`) when the join runs on the PointDecoder.

Without a shared cache (the in-process LRU), or when a replica can't read the value (Redis down
or the value evicted: `EmbeddingUnavailable`), the embedding travels as bytes, as it always did:
the Ingress retries the request that way. Service degrades, answers don't change.

`payload_bytes` counts what a call carries (arrays, bytes, strings), for the bytes each request
moves between replicas.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from biprompt.cache import Cached, unpack_embedding
from biprompt.errors import OverloadedError
from biprompt.types import ImageEmbedding

REPLICA_EMBEDDINGS = 16  # embeddings a model replica keeps (2-4 MB each at ViT-H scale)


class EmbeddingUnavailable(OverloadedError):
    """A replica could not read the embedding a ref names (evicted, or the cache is down): the
    Ingress sends the embedding itself instead (and a 503 to retry, should that fail too)."""

    type = "embedding_unavailable"


@dataclasses.dataclass(frozen=True)
class EmbeddingRef:
    """An embedding by its cache key, with its header (what callers need without the arrays)."""

    key: str
    header: dict

    @property
    def image_id(self) -> str | None:
        return self.header.get("image_id")


@dataclasses.dataclass(frozen=True)
class CachedMask:
    """An expert mask the Ingress found cached (COCO RLE under `key`, made by `model_id`): the
    PointDecoder reads it from the cache itself, so a warm click does not carry it through the
    Ingress (tens of KB for a ragged mask at 640x480)."""

    key: str
    model_id: str


def header_of(value: bytes | EmbeddingRef) -> dict:
    from biprompt.cache import embedding_header

    return value.header if isinstance(value, EmbeddingRef) else embedding_header(value)


class ReplicaEmbeddings:
    """The embeddings one model replica holds, by cache key: `get(value)` for an embedding sent
    as bytes or named by an `EmbeddingRef`. Inside a Serve replica the loader is Serve's
    multiplexed one (its LRU, and the router learns which replica holds which key); elsewhere a
    plain LRU of the same size."""

    def __init__(self, cache: Cached, model_id: str, capacity: int = REPLICA_EMBEDDINGS):
        self.cache, self.model_id, self.capacity = cache, model_id, max(1, int(capacity))
        self.counts = {"loads": 0, "load_bytes": 0, "unavailable": 0, "sent": 0}
        self._local: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._load = self._multiplexed()

    def _multiplexed(self):
        from ray import serve
        from ray.serve.context import _get_internal_replica_context

        if _get_internal_replica_context() is None:
            return None

        async def embedding(key: str) -> ImageEmbedding:  # a function: Serve keeps its LRU on it
            return await self._fetch(key)

        self._loader = embedding
        return serve.multiplexed(max_num_models_per_replica=self.capacity)(embedding)

    def held(self) -> int:
        if self._load is None:
            return len(self._local)
        # NOTE: Serve's wrapper (not public API), read for stats only
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        return len(wrapper.models) if wrapper is not None else 0

    async def get(self, value: bytes | EmbeddingRef) -> ImageEmbedding:
        if not isinstance(value, EmbeddingRef):
            self.counts["sent"] += 1
            return unpack_embedding(value, self.model_id)
        if self._load is not None:
            return await self._load(value.key)
        emb = self._local.get(value.key)
        if emb is not None:
            self._local.move_to_end(value.key)
            return emb
        emb = await self._fetch(value.key)
        self._local[value.key] = emb
        while len(self._local) > self.capacity:
            self._local.popitem(last=False)
        return emb

    async def _fetch(self, key: str) -> ImageEmbedding:
        blob = await self.cache.store.get(key)
        if blob is None:
            self.counts["unavailable"] += 1
            raise EmbeddingUnavailable(f"the embedding {key} is not in the shared cache")
        try:
            emb = unpack_embedding(blob, self.model_id)
        except Exception as exc:  # noqa: BLE001 - a corrupt value: the Ingress sends its own
            self.counts["unavailable"] += 1
            await self.cache.store.delete(key)
            raise EmbeddingUnavailable(f"the cached embedding {key} is unreadable: {exc}") from None
        self.counts["loads"] += 1
        self.counts["load_bytes"] += len(blob)
        return emb

    def stats(self) -> dict:
        return {**self.counts, "held": self.held(), "capacity": self.capacity,
                "routing": "multiplexed" if self._load is not None else "local"}


def payload_bytes(obj: Any) -> int:
    """The bytes a call's arguments or reply carry: arrays, tensors, bytes and strings, through
    dicts, sequences and dataclasses (8 per scalar). Ray's own framing is not counted."""
    if obj is None:
        return 0
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode("utf-8", "surrogatepass"))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, torch.Tensor):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 8

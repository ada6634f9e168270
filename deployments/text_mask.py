"""TextMask: BEiT-3 + EVF-SAM's decoder on batched (image, text) pairs (a GPU in production).

It reads the same SAM embedding the point decoder uses: no second encoder pass (sent as bytes, or
an `EmbeddingRef` to the replica's own copy: deployments/embeddings.py). With a shared cache it
stores each mask (COCO RLE) under (image, text, text model), so repeated words skip BEiT-3.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from biprompt.cache import Cached, pack_mask_rle
from biprompt.engines import TextMaskEngine
from biprompt.errors import InvalidPromptError
from biprompt.types import ImageEmbedding
from deployments.common import (
    build_engine,
    chosen_again,
    configure_replica,
    make_cache,
    metrics,
    pack_rle,
    replica_stats,
    run_model,
    warm_up,
)
from deployments.embeddings import EmbeddingRef, ReplicaEmbeddings
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


class TextMask:
    def __init__(self, args: AppArgs, *, engine: TextMaskEngine | None = None,
                 cache: Cached | None = None):
        self.clock = ReplicaClock()
        self.args = args
        if engine is None and args.profile().text is not None:
            engine = build_engine("text", args)
        self.engine = engine  # None: the profile has no text model
        self.cache = cache or make_cache(args)
        self.embeddings = ReplicaEmbeddings(
            self.cache, self.engine.sam_model_id if self.engine else "", args.replica_embeddings)
        self.counts = {"requests": 0, "pairs": 0, "batches": 0, "failed": 0}
        if self.engine is not None:
            warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._run, user_config)
        if self.engine is not None:
            self.engine = chosen_again(self.engine, "text", self.args, self.clock)

    def stats(self) -> dict:
        return replica_stats(self.clock, self.engine, **self.counts,
                             embeddings=self.embeddings.stats())

    async def __call__(self, embedding: bytes | EmbeddingRef, text: str,
                       cache_key: str | None = None) -> dict:
        self.counts["requests"] += 1
        if self.engine is None:
            raise InvalidPromptError("this deployment has no text model: use mode 'point'")
        # checked one by one, before batching: one over-long text must not fail its batch-mates
        self.engine.validate(text)
        emb = await self._embedding(embedding)
        mask, ms = unwrap(await self._run((emb, text)))
        packed = pack_rle(mask)
        if cache_key and self.cache.store.shared:
            await self.cache.store.set(cache_key, pack_mask_rle(packed["rle"][0],
                                                                self.engine.model_id))
        return {"mask": packed, "text_ms": ms}

    async def _embedding(self, value):
        """The request's embedding; one that can't be read fails this request alone, before it
        joins a batch (counted as failed)."""
        try:
            return await self.embeddings.get(value)
        except Exception:
            self.counts["failed"] += 1
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[tuple[ImageEmbedding, str]]
                   ) -> list[tuple[np.ndarray, float] | Exception]:
        """One model call for the batch's distinct (image, text) pairs (concurrent requests may
        ask the same twice). A pair that fails the model fails alone."""
        keys: list[tuple[str, str]] = []
        pairs: dict[tuple[str, str], tuple[ImageEmbedding, str]] = {}
        for i, (emb, text) in enumerate(items):
            key = (emb.image_id or str(i), text.strip())
            if key not in pairs:
                pairs[key] = (emb, key[1])
            keys.append(key)
        unique = list(pairs)
        masks, ms = await run_model(isolated, self._masks, [pairs[k] for k in unique], "TextMask")
        by_key: dict = dict(zip(unique, masks, strict=True))
        done = len(unique) - failures(masks)
        self.counts["batches"] += 1
        self.counts["pairs"] += done
        self.counts["failed"] += len(by_key) - done
        if done:
            metrics()["text_pairs"].inc(done)
        metrics()["batch"].observe(len(by_key), tags={"role": "TextMask"})
        per_pair = ms / max(1, len(unique))
        return [v if isinstance(v := by_key[k], Exception) else (v, per_pair) for k in keys]

    def _masks(self, pairs: list[tuple[ImageEmbedding, str]]) -> list[np.ndarray]:
        return self.engine.text_masks([e for e, _ in pairs], [t for _, t in pairs])

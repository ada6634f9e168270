"""TextMask: BEiT-3 + EVF-SAM's decoder on batched (image, text) pairs (a GPU in production).

It reads the same SAM embedding the point decoder uses: no second encoder pass. With a shared
cache it stores each mask under (image, text, text model), so repeated words skip BEiT-3.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from biprompt.cache import Cached, embedding_header, pack_mask, unpack_embedding
from biprompt.engines import TextMaskEngine
from biprompt.errors import InvalidPromptError
from biprompt.types import ImageEmbedding
from deployments.common import (
    build_engine,
    configure_replica,
    make_cache,
    metrics,
    pack_bits,
    replica_stats,
    run_model,
    warm_up,
)
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


class TextMask:
    def __init__(self, args: AppArgs, *, engine: TextMaskEngine | None = None,
                 cache: Cached | None = None):
        self.clock = ReplicaClock()
        if engine is None and args.profile().text is not None:
            engine = build_engine("text", args)
        self.engine = engine  # None: the profile has no text model
        self.cache = cache or make_cache(args)
        self.counts = {"requests": 0, "pairs": 0, "batches": 0, "failed": 0}
        if self.engine is not None:
            warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._run, user_config)

    def stats(self) -> dict:
        return replica_stats(self.clock, self.engine, **self.counts)

    async def __call__(self, embedding: bytes, text: str, cache_key: str | None = None) -> dict:
        self.counts["requests"] += 1
        if self.engine is None:
            raise InvalidPromptError("this deployment has no text model: use mode 'point'")
        # checked one by one, before batching: one over-long text must not fail its batch-mates
        self.engine.validate(text)
        mask, ms = unwrap(await self._run((embedding, text)))
        if cache_key and self.cache.store.shared:
            await self.cache.store.set(cache_key, pack_mask(mask, self.engine.model_id))
        return {"mask": pack_bits(mask), "text_ms": ms}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[tuple[bytes, str]]
                   ) -> list[tuple[np.ndarray, float] | Exception]:
        """One model call for the batch's distinct (image, text) pairs (concurrent requests may
        ask the same twice). A pair that fails (its embedding, or the model) fails alone."""
        keys: list[tuple[str, str]] = []
        pairs: dict[tuple[str, str], tuple[ImageEmbedding, str]] = {}
        failed: dict[tuple[str, str], Exception] = {}
        for i, (blob, text) in enumerate(items):
            key = ("", str(i))  # this item alone, if its header can't be read
            try:
                key = (embedding_header(blob).get("image_id") or str(i), text.strip())
                if key not in pairs and key not in failed:
                    pairs[key] = (unpack_embedding(blob, self.engine.sam_model_id), key[1])
            except Exception as exc:  # noqa: BLE001 - this item's own error
                failed[key] = exc
            keys.append(key)
        unique = list(pairs)
        masks, ms = await run_model(isolated, self._masks, [pairs[k] for k in unique], "TextMask")
        by_key: dict = {**dict(zip(unique, masks, strict=True)), **failed}
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

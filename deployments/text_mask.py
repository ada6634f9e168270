"""TextMask: BEiT-3 + EVF-SAM's decoder on batched (image, text) pairs (a GPU in production).

It reads the same SAM embedding the point decoder uses: no second encoder pass. With a shared
cache it stores each mask under (image, text, text model), so repeated words skip BEiT-3.
"""

from __future__ import annotations

import numpy as np
import torch
from ray import serve

from biprompt.cache import pack_mask, unpack_embedding
from biprompt.errors import InvalidPromptError
from deployments.common import (
    configure_replica,
    load_pipeline,
    make_cache,
    metrics,
    pack_bits,
    run_model,
)


class TextMask:
    def __init__(self, config: dict):
        self.pipe = load_pipeline(config, roles=("text",))
        self.cache = make_cache(config)
        self.counts = {"requests": 0, "pairs": 0, "batches": 0}

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._run, user_config)

    def stats(self) -> dict:
        return {**self.counts, "torch_threads": torch.get_num_threads()}

    async def __call__(self, embedding: bytes, text: str, cache_key: str | None = None) -> dict:
        self.counts["requests"] += 1
        if self.pipe.text is None:
            raise InvalidPromptError("this deployment has no text model: use mode 'point'")
        # checked one by one, before batching: one over-long text must not fail its batch-mates
        self.pipe.text.tokenizer.validate(text)
        mask, ms = await self._run((embedding, text))
        if cache_key and self.cache.store.shared:
            await self.cache.store.set(cache_key, pack_mask(mask, self.pipe.text.model_id))
        return {"mask": pack_bits(mask), "text_ms": ms}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[tuple[bytes, str]]) -> list[tuple[np.ndarray, float]]:
        embs = [unpack_embedding(blob, self.pipe.sam_model_id) for blob, _ in items]
        masks, ms = await run_model(self.pipe.text_masks, embs, [t.strip() for _, t in items])
        self.counts["batches"] += 1
        self.counts["pairs"] += len(items)
        metrics()["text_pairs"].inc(len(items))
        metrics()["batch"].observe(len(items), tags={"role": "TextMask"})
        return [(m, ms / len(items)) for m in masks]

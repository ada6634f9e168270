"""PointDecoder: SAM's prompt encoder and mask decoder (a fraction of a GPU in production).

Batches (embedding, prompt) pairs across requests; prompts on the same image decode together, one
decoder call per prompt shape. Returns SAM's three candidates and their predicted IoUs.
"""

from __future__ import annotations

from ray import serve

from biprompt.cache import embedding_header, unpack_embedding
from biprompt.engines import PointDecoderEngine
from biprompt.prompts import Prompt
from deployments.common import (
    build_engine,
    configure_replica,
    metrics,
    pack_bits,
    replica_stats,
    run_model,
    warm_up,
)
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


class PointDecoder:
    def __init__(self, args: AppArgs, *, engine: PointDecoderEngine | None = None):
        self.clock = ReplicaClock()
        self.engine = engine or build_engine("points", args)
        self.counts = {"requests": 0, "prompts": 0, "batches": 0}
        warm_up(self.engine)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._decode, user_config)

    def stats(self) -> dict:
        return replica_stats(self.clock, self.engine, **self.counts)

    async def __call__(self, embedding: bytes, prompt: Prompt) -> dict:
        self.counts["requests"] += 1
        return await self._decode((embedding, prompt))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _decode(self, items: list[tuple[bytes, Prompt]]) -> list[dict]:
        out, ms = await run_model(self._decode_sync, items)
        self.counts["batches"] += 1
        self.counts["prompts"] += len(items)
        metrics()["decoder_prompts"].inc(len(items))
        metrics()["batch"].observe(len(items), tags={"role": "PointDecoder"})
        for r in out:
            r["decoder_ms"] = ms / len(items)
        return out

    def _decode_sync(self, items: list[tuple[bytes, Prompt]]) -> list[dict]:
        by_image: dict[str, list[int]] = {}
        for i, (blob, _) in enumerate(items):
            by_image.setdefault(embedding_header(blob).get("image_id") or str(i), []).append(i)
        out: list[dict | None] = [None] * len(items)
        for idx in by_image.values():
            blob = items[idx[0]][0]
            emb = unpack_embedding(blob, self.engine.model_id)
            cands = self.engine.decode_points(emb, [items[i][1] for i in idx])
            for i, c in zip(idx, cands, strict=True):
                out[i] = {"masks": pack_bits(c.masks), "scores": c.scores}
        return out  # type: ignore[return-value]

"""PointDecoder: SAM's prompt encoder and mask decoder (a fraction of a GPU in production).

Batches (embedding, prompt) pairs across requests; prompts on the same image decode together, one
decoder call per prompt shape. Returns SAM's three candidates and their predicted IoUs.
"""

from __future__ import annotations

import numpy as np
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
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


class PointDecoder:
    def __init__(self, args: AppArgs, *, engine: PointDecoderEngine | None = None):
        self.clock = ReplicaClock()
        self.engine = engine or build_engine("points", args)
        self.counts = {"requests": 0, "prompts": 0, "batches": 0, "failed": 0}
        warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._decode, user_config)

    def stats(self) -> dict:
        # the engine's backend, how `auto` chose it, and its batched-or-looped choice
        describe = getattr(self.engine, "describe", None)
        return replica_stats(self.clock, self.engine, **self.counts,
                             decoder=describe() if describe else None)

    async def __call__(self, embedding: bytes, prompt: Prompt) -> dict:
        self.counts["requests"] += 1
        return unwrap(await self._decode((embedding, prompt)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _decode(self, items: list[tuple[bytes, Prompt]]) -> list[dict | Exception]:
        out, ms = await run_model(self._decode_sync, items)
        done = len(items) - failures(out)
        self.counts["batches"] += 1
        self.counts["prompts"] += done
        self.counts["failed"] += len(items) - done
        if done:
            metrics()["decoder_prompts"].inc(done)
        metrics()["batch"].observe(len(items), tags={"role": "PointDecoder"})
        for r in out:
            if isinstance(r, dict):
                r["decoder_ms"] = ms / len(items)
        return out

    def _decode_sync(self, items: list[tuple[bytes, Prompt]]) -> list[dict | Exception]:
        """One decoder call per image; an embedding that can't be read fails the prompts on it,
        a prompt that fails the decoder fails alone (`isolated`)."""
        out: list[dict | Exception | None] = [None] * len(items)
        by_image: dict[str, list[int]] = {}
        for i, (blob, _) in enumerate(items):
            try:
                img = embedding_header(blob).get("image_id") or str(i)
            except Exception as exc:  # noqa: BLE001 - this item's own error
                out[i] = exc
                continue
            by_image.setdefault(img, []).append(i)
        for idx in by_image.values():
            try:
                emb = unpack_embedding(items[idx[0]][0], self.engine.model_id)
            except Exception as exc:  # noqa: BLE001 - the error of every prompt on this image
                for i in idx:
                    out[i] = exc
                continue

            def decode(prompts: list[Prompt], emb=emb) -> list[dict]:
                # low-res logits in float16: the selected one may be the next click's mask_input
                return [{"masks": pack_bits(c.masks), "scores": c.scores,
                         "logits": None if c.low_res_logits is None
                         else c.low_res_logits.astype(np.float16)}
                        for c in self.engine.decode_points(emb, prompts)]

            results = isolated(decode, [items[i][1] for i in idx], "PointDecoder")
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

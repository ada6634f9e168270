"""PointDecoder: SAM's prompt encoder and mask decoder (a fraction of a GPU in production).

Batches (embedding, prompt) pairs across requests; prompts on the same image decode together, one
decoder call per prompt shape. Returns SAM's three candidates (COCO RLE) and their predicted IoUs.
The embedding arrives as bytes or as an `EmbeddingRef` to the replica's own copy
(deployments/embeddings.py).
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from biprompt.cache import Cached
from biprompt.engines import PointDecoderEngine
from biprompt.prompts import Prompt
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
from deployments.embeddings import (
    CachedMask,
    EmbeddingRef,
    EmbeddingUnavailable,
    ReplicaEmbeddings,
)
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.selector import select
from deployments.settings import AppArgs


class PointDecoder:
    def __init__(self, args: AppArgs, *, engine: PointDecoderEngine | None = None,
                 cache: Cached | None = None):
        self.clock = ReplicaClock()
        self.args = args
        self.engine = engine or build_engine("points", args)
        self.cache = cache or make_cache(args)
        self.embeddings = ReplicaEmbeddings(self.cache, self.engine.model_id,
                                            args.replica_embeddings)
        self.threshold = float(args.resolved().agreement_threshold)
        self.rule = args.resolved().profile().selection_rule
        self.weights = args.resolved().profile().selection_weights
        self.arbiter = args.resolved().profile().selection_arbiter
        self.counts = {"requests": 0, "prompts": 0, "batches": 0, "failed": 0, "joined": 0,
                       "cached_masks_read": 0}
        warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._decode, user_config)
        self.engine = chosen_again(self.engine, "points", self.args, self.clock)

    def stats(self) -> dict:
        # the engine's backend, how `auto` chose it, and its batched-or-looped choice
        describe = getattr(self.engine, "describe", None)
        return replica_stats(self.clock, self.engine, **self.counts,
                             decoder=describe() if describe else None,
                             embeddings=self.embeddings.stats())

    async def __call__(self, embedding: bytes | EmbeddingRef, prompt: Prompt,
                       logits: bool = True, join: dict | None = None) -> dict:
        """SAM's candidates for `prompt`; `logits`: with each candidate's low-res logits (the
        next refinement click's mask_input; 128 KB each at 256x256 float16).

        `join` ({"spec", "experts"}: what the Selector would get, every expert mask already
        known): the join runs here, next to the candidates, and the answer is the Selector's
        (`{"joined": ...}`): one hop and three full-size masks fewer."""
        self.counts["requests"] += 1
        emb = await self._embedding(embedding)
        experts = await self._experts(join["experts"]) if join is not None else None
        reply = unwrap(await self._decode((emb, prompt, logits)))
        if join is None:
            return reply
        self.counts["joined"] += 1
        return {"joined": await asyncio.to_thread(select, reply, join["spec"], self.threshold,
                                                  self.rule, self.weights, self.arbiter,
                                                  **experts)}

    async def _experts(self, experts: dict) -> dict:
        """The join's expert masks; one named by its cache key (`CachedMask`: the Ingress saw
        it cached) is read here from the shared cache, not carried through the Ingress. Gone
        since (evicted, Redis down): EmbeddingUnavailable, and the Ingress sends it by value."""
        out = {}
        for name, value in experts.items():
            if isinstance(value, CachedMask):
                rle = await self.cache.get_mask_rle(value.key, value.model_id, f"{name}_mask")
                if rle is None:
                    self.counts["failed"] += 1
                    raise EmbeddingUnavailable(f"the cached {name} mask {value.key} is gone")
                value = {"rle": [rle], "shape": tuple(rle["size"])}
                self.counts["cached_masks_read"] += 1
            out[name] = value
        return out

    async def _embedding(self, value):
        """The request's embedding; one that can't be read fails this request alone, before it
        joins a batch (counted as failed)."""
        try:
            return await self.embeddings.get(value)
        except Exception:
            self.counts["failed"] += 1
            raise

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _decode(self, items: list[tuple[ImageEmbedding, Prompt, bool]]
                      ) -> list[dict | Exception]:
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

    def _decode_sync(self, items: list[tuple[ImageEmbedding, Prompt, bool]]
                     ) -> list[dict | Exception]:
        """One decoder call per image; a prompt that fails the decoder fails alone
        (`isolated`)."""
        out: list[dict | Exception | None] = [None] * len(items)
        by_image: dict[str | int, list[int]] = {}
        for i, (emb, _, _) in enumerate(items):
            by_image.setdefault(emb.image_id or id(emb), []).append(i)
        for idx in by_image.values():
            emb = items[idx[0]][0]

            def decode(prompts: list[Prompt], emb=emb) -> list[dict]:
                return list(self.engine.decode_points(emb, prompts))

            results = isolated(decode, [items[i][1] for i in idx], "PointDecoder")
            for i, r in zip(idx, results, strict=True):
                # low-res logits in float16, when asked: the selected one may be the next
                # click's mask_input
                out[i] = r if isinstance(r, Exception) else {
                    "masks": pack_rle(r.masks), "scores": r.scores,
                    "logits": None if r.low_res_logits is None or not items[i][2]
                    else r.low_res_logits.astype(np.float16)}
        return out  # type: ignore[return-value]

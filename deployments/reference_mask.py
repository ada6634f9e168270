"""ReferenceMask: the reference-image expert (VRP-SAM style) on batched target images.

A request names its reference by key (reference image, annotation); the replica holds the
reference's features in a small LRU, else reads them from the shared cache, else computes them
once from the reference image's embedding and the annotation (single-flight per key inside the
replica) and stores them: a reference used for a thousand target images is encoded once. Each
target mask is stored too (COCO RLE, keyed by target image and reference), so a later click on the
same image skips the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import numpy as np
from ray import serve

from biprompt.cache import Cached, CacheFormatError, pack_mask_rle
from biprompt.engines import ReferenceMaskEngine
from biprompt.engines.reference_mask import features_from_bytes, features_to_bytes
from biprompt.errors import InvalidPromptError
from biprompt.models.vrp import ReferenceFeatures
from biprompt.types import ImageEmbedding
from deployments.common import (
    build_engine,
    configure_replica,
    make_cache,
    metrics,
    pack_rle,
    replica_stats,
    run_model,
    unpack_bits,
    warm_up,
)
from deployments.embeddings import EmbeddingRef, ReplicaEmbeddings
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.settings import AppArgs

log = logging.getLogger(__name__)
REFERENCES_HELD = 64  # references' features per replica (a few KB each)


class ReferenceMask:
    def __init__(self, args: AppArgs, *, engine: ReferenceMaskEngine | None = None,
                 cache: Cached | None = None):
        self.clock = ReplicaClock()
        self.args = args
        if engine is None and args.profile().reference is not None:
            engine = build_engine("reference", args)
        self.engine = engine  # None: the profile has no reference model
        self.cache = cache or make_cache(args)
        self.embeddings = ReplicaEmbeddings(
            self.cache, self.engine.sam_model_id if self.engine else "", args.replica_embeddings)
        self.references: OrderedDict[str, ReferenceFeatures] = OrderedDict()
        self._encoding: dict[str, asyncio.Future] = {}
        self.counts = {"requests": 0, "targets": 0, "batches": 0, "failed": 0,
                       "references_encoded": 0, "references_read": 0, "references_held": 0}
        if self.engine is not None:
            warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._run, user_config)

    def stats(self) -> dict:
        return replica_stats(self.clock, self.engine, **self.counts,
                             embeddings=self.embeddings.stats())

    async def __call__(self, embedding: bytes | EmbeddingRef, reference: dict,
                       cache_key: str | None = None) -> dict:
        """embedding: the target image's; reference: {"key": features' cache key, "embedding":
        the reference image's (bytes or EmbeddingRef), and its annotation: "mask" (packed RLE)
        or "points"/"labels"/"box"}; cache_key: where the target mask is stored."""
        self.counts["requests"] += 1
        if self.engine is None:
            raise InvalidPromptError("this deployment has no reference model: leave out "
                                     "`reference`")
        try:
            features = await self._features(reference)
            emb = await self.embeddings.get(embedding)
        except Exception:
            self.counts["failed"] += 1
            raise
        mask, ms = unwrap(await self._run((emb, features)))
        packed = pack_rle(mask)
        if cache_key and self.cache.store.shared:
            await self.cache.store.set(cache_key, pack_mask_rle(packed["rle"][0],
                                                                self.engine.model_id))
        return {"mask": packed, "reference_ms": ms}

    # --- the reference's features ---------------------------------------------------------

    async def _features(self, reference: dict) -> ReferenceFeatures:
        key = reference["key"]
        held = self.references.get(key)
        if held is not None:
            self.references.move_to_end(key)
            self.counts["references_held"] += 1
            return held
        pending = self._encoding.get(key)
        if pending is None:  # single-flight: concurrent first uses share one encoding
            pending = asyncio.ensure_future(self._load_or_encode(reference))
            self._encoding[key] = pending
            pending.add_done_callback(lambda _f: self._encoding.pop(key, None))
        features = await asyncio.shield(pending)
        self.references[key] = features
        while len(self.references) > REFERENCES_HELD:
            self.references.popitem(last=False)
        return features

    async def _load_or_encode(self, reference: dict) -> ReferenceFeatures:
        key, model_id = reference["key"], self.engine.model_id
        blob = await self.cache.store.get(key)
        if blob is not None:
            try:
                features = features_from_bytes(blob, model_id)
                self.counts["references_read"] += 1
                return features
            except CacheFormatError as exc:
                log.warning("dropping corrupt reference features %s: %s", key, exc)
                await self.cache.store.delete(key)
        ref_emb = await self.embeddings.get(reference["embedding"])
        mask = unpack_bits(reference["mask"]) if reference.get("mask") is not None else None
        features, _ = await run_model(self._encode, ref_emb, mask, reference)
        self.counts["references_encoded"] += 1
        blob = features_to_bytes(features, model_id)
        await self.cache.store.set(key, blob)
        # NOTE: the stored (float16) features, not the fresh ones: every use of a reference,
        # first or thousandth, on any replica, computes on the same values
        return features_from_bytes(blob, model_id)

    def _encode(self, emb: ImageEmbedding, mask: np.ndarray | None, reference: dict):
        m = self.engine.annotation_mask(emb, mask=mask, points=reference.get("points"),
                                        labels=reference.get("labels"), box=reference.get("box"))
        return self.engine.reference_features([emb], [m])[0]

    # --- target masks, batched ------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run(self, items: list[tuple[ImageEmbedding, ReferenceFeatures]]
                   ) -> list[tuple[np.ndarray, float] | Exception]:
        """One model call for the batch; a target that fails the model fails alone."""
        masks, ms = await run_model(isolated, self._masks, items, "ReferenceMask")
        done = len(items) - failures(masks)
        self.counts["batches"] += 1
        self.counts["targets"] += done
        self.counts["failed"] += len(items) - done
        metrics()["batch"].observe(len(items), tags={"role": "ReferenceMask"})
        per = ms / max(1, len(items))
        return [m if isinstance(m, Exception) else (m, per) for m in masks]

    def _masks(self, items: list[tuple[ImageEmbedding, ReferenceFeatures]]) -> list[np.ndarray]:
        return self.engine.reference_masks([e for e, _ in items], [f for _, f in items])

"""ImageEncoder: SAM's image encoder over batches of images (a GPU each in production).

Takes a decoded RGB array and its image id; returns the cache-format value (fp16 embedding +
header), which the point decoder and text model take as their input. With a shared cache (Redis)
it writes the value itself, and looks first: another ingress replica may have just encoded the
same image; then it answers an `EmbeddingRef` (the key and the header: the model replicas read the
value from the cache themselves, deployments/embeddings.py), and the value itself only when it
could not be stored.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from biprompt.cache import Cached, embedding_header, embedding_key, pack_embedding
from biprompt.engines import ImageEncoderEngine
from biprompt.engines.reference_mask import reference_model_id
from deployments.common import (
    build_engine,
    chosen_again,
    configure_replica,
    make_cache,
    metrics,
    replica_stats,
    run_model,
    warm_up,
)
from deployments.embeddings import EmbeddingRef
from deployments.isolation import failures, isolated, unwrap
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


class ImageEncoder:
    def __init__(self, args: AppArgs, *, engine: ImageEncoderEngine | None = None,
                 cache: Cached | None = None):
        self.clock = ReplicaClock()
        self.args = args
        self.engine = engine or build_engine("encoder", args)
        self.dtype = args.embedding_dtype
        self.cache = cache or make_cache(args)
        self.model_id = self.engine.model_id
        self.counts = {"requests": 0, "images": 0, "batches": 0, "failed": 0,
                       "shared_cache_hits": 0}
        warm_up(self.engine, self.clock)
        self.clock.ready()

    def reconfigure(self, user_config: dict) -> None:
        configure_replica(self._encode, user_config)
        self.engine = chosen_again(self.engine, "encoder", self.args, self.clock)

    def info(self) -> dict:
        text = self.engine.text
        ref = self.args.profile().reference if self.args is not None else None
        return {
            "model": {"sam": self.model_id, "text": text.model_id if text else None,
                      "reference": (reference_model_id(ref, self.engine.spec)
                                    if ref is not None else None)},
            "sam_variant": self.engine.spec.name,
            "image_size": self.engine.spec.img_size,
            "text_model": text is not None,
            "reference_model": ref is not None,
        }

    def stats(self) -> dict:
        return replica_stats(self.clock, self.engine, **self.counts)

    async def __call__(self, rgb: np.ndarray, image_id: str,
                       by_value: bool = False) -> bytes | EmbeddingRef:
        """The image's embedding: a ref once stored in the shared cache, else the value's bytes
        (`by_value`: always the bytes, for a request resent because a replica could not read
        the cache)."""
        self.counts["requests"] += 1
        key = embedding_key(self.model_id, image_id)
        if self.cache.store.shared:
            if by_value:
                blob = await self.cache.get_embedding_blob(key, self.model_id)
                if blob is not None:
                    self.counts["shared_cache_hits"] += 1
                    return blob
            else:
                header = await self.cache.get_embedding_header(key, self.model_id)
                if header is not None:
                    self.counts["shared_cache_hits"] += 1
                    return EmbeddingRef(key, header)
        # arrays from another process arrive as read-only views
        return unwrap(await self._encode((np.array(rgb), image_id, key, by_value)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode(self, items: list[tuple[np.ndarray, str, str, bool]]
                      ) -> list[bytes | EmbeddingRef | Exception]:
        """One encoder call for the batch's distinct images. An image that fails (in
        preprocessing or in the model) fails alone: its slot holds its error (`isolated`)."""
        unique: dict[str, np.ndarray] = {}
        for rgb, _, key, _ in items:
            unique.setdefault(key, rgb)
        embs, ms = await run_model(isolated, self.engine.embed_rgb, list(unique.values()),
                                   "ImageEncoder")
        done = len(unique) - failures(embs)
        self.counts["batches"] += 1
        self.counts["images"] += done
        self.counts["failed"] += len(unique) - done
        if done:
            metrics()["encoder_images"].inc(done)
        metrics()["batch"].observe(len(unique), tags={"role": "ImageEncoder"})
        blobs: dict[str, bytes | Exception] = {}
        stored: set[str] = set()
        for key, emb in zip(unique, embs, strict=True):
            if not isinstance(emb, Exception):
                emb = self._pack(key, emb, ms, len(unique))
            blobs[key] = emb
            if self.cache.store.shared and isinstance(emb, bytes):
                if await self.cache.store.set(key, emb):  # stored: the replicas read it there
                    stored.add(key)
        return [EmbeddingRef(key, embedding_header(blobs[key]))
                if key in stored and not by_value else blobs[key]
                for _, _, key, by_value in items]

    def _pack(self, key: str, emb, ms: float, batch_size: int) -> bytes | Exception:
        try:
            emb.image_id = key.rsplit(":", 1)[1]
            return pack_embedding(emb, self.dtype, encode_ms=ms / batch_size,
                                  batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001 - this image's own error
            return exc

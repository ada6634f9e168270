"""Ingress: the v1 routes on the FastAPI app of deployments/http.py. Validation, auth, the cache
lookups and the fan-out; no model math.

One segment request:
    hash the image -> embedding cache -> (miss) ImageEncoder, single-flight per image
      -> PointDecoder, TextMask and ReferenceMask (with a reference: its image's embedding the
         same way) in parallel on the same embedding -> Selector joins them -> response.

No `from __future__ import annotations` here: FastAPI must resolve the route signatures' types.
"""


import asyncio
import hmac
import inspect
import logging
import time
import uuid
from typing import Any

import numpy as np
from biprompt_client.schema import (
    MAX_NESTING_DEPTH,
    MAX_TEXT_CHARS,
    MAX_WIRE_POINTS,
    BatchEnvelope,
    BatchRequest,
    BatchResponse,
    EmbedRequest,
    EmbedResponse,
    ModelInfo,
    SegmentRequest,
    SegmentResponse,
    WireError,
    decode_body,
    encode_body,
    media_type,
)
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from biprompt.cache import (
    Cached,
    CacheFormatError,
    embedding_key,
    logits_key,
    pack_logits,
    pack_mask_rle,
    reference_key,
    reference_mask_key,
    text_mask_key,
    unpack_logits,
)
from biprompt.cache import image_id as hash_image
from biprompt.config import LOGITS_TTL_S, MAX_POINTS, MAX_TEXT_TOKENS
from biprompt.config import MAX_TEXT_CHARS as MODEL_TEXT_CHARS
from biprompt.engines.reference_mask import annotation_key
from biprompt.errors import (
    InvalidInputError,
    InvalidPromptError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from biprompt.images import decode_image_bytes
from biprompt.preprocess import check_model_input
from biprompt.prompts import make_prompt
from deployments.common import make_cache, pack_rle, replica_stats
from deployments.embeddings import (
    CachedMask,
    EmbeddingRef,
    EmbeddingUnavailable,
    header_of,
    payload_bytes,
)
from deployments.http import (
    PUBLIC_PATHS,
    api,
    as_api_error,
    body_doc,
    error_info,
    reply_media,
    responses,
)
from deployments.isolation import log_retry, lost_replica
from deployments.label_studio import LabelStudioBackend, parse_json
from deployments.process import ReplicaClock
from deployments.settings import AppArgs
from deployments.web import add_demo_page


async def _settled(value):
    """`value`, awaited if it is a model's pending answer (a DeploymentResponse)."""
    return await value if inspect.isawaitable(value) else value


add_demo_page(api)  # GET / and /demo/: the web page (deployments/web), public like /docs


# NOTE: serve.ingress must run where the class is defined: it rewrites the routes registered on
# `api`, and every replica re-imports this module (routes fixed up in graph.py's process only
# would reach replicas unfixed). serve.deployment and its options are applied in graph.py.
@serve.ingress(api)
class Ingress:

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle,
                 text: DeploymentHandle, selector: DeploymentHandle, args: AppArgs, *,
                 cache: Cached | None = None, reference: DeploymentHandle | None = None):
        self.clock = ReplicaClock()
        self.encoder, self.decoder, self.text, self.selector = encoder, decoder, text, selector
        self.reference = reference
        self.args = args
        self.cache = cache or make_cache(args)
        self.api_key = args.api_key or None
        self.max_body = int(args.max_body_mb * 2**20)
        self.max_pixels = int(args.max_image_pixels)
        self.max_items = int(args.max_batch_items)
        self._info: dict | None = None
        self._inflight: dict[str, DeploymentResponse] = {}
        self.replica_retries = 0  # requests tried again because a model replica died under them
        self.embedding_lookups = {"hit": 0, "miss": 0}  # this replica's, by outcome
        self.embedding_resends = 0  # requests sent again with the embedding's bytes
        self.moved = {"requests": 0, "bytes": 0}  # payload bytes between replicas, all requests
        self._tasks: set[asyncio.Task] = set()
        self.label_studio = LabelStudioBackend.from_env(self.segment_one, self.info,
                                                        max_image_bytes=self.max_body,
                                                        api_key=self.api_key)
        self.clock.ready()

    # --- plumbing ---------------------------------------------------------------------------

    def stats(self) -> dict:
        return replica_stats(self.clock, inflight_encodes=len(self._inflight),
                             replica_retries=self.replica_retries,
                             embedding_lookups=dict(self.embedding_lookups),
                             embedding_resends=self.embedding_resends,
                             bytes_moved=dict(self.moved))

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    def _auth(self, request: Request) -> None:
        if not self.api_key or request.url.path in PUBLIC_PATHS:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def _parse(self, request: Request, model):
        self._auth(request)
        body = await self._body(request)
        try:
            return model.model_validate(decode_body(body, media_type(request.headers.get("content-type"))))
        except (ValidationError, WireError) as exc:
            raise as_api_error(exc) from None

    async def _body(self, request: Request) -> bytes:
        """The body, read up to the body limit; never empty."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise PayloadTooLargeError(f"body is {declared} bytes; the limit is {self.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLargeError(f"body exceeds the limit of {self.max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise InvalidInputError("empty body: send a JSON or msgpack object")
        return body

    def _reply(self, request: Request, obj: Any) -> Response:
        media = reply_media(request)
        return Response(encode_body(obj, media), 200, media_type=media)

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- embeddings -------------------------------------------------------------------------

    async def _embedding(self, image: bytes | None, img_id: str | None, timings: dict,
                         refs: bool = True, moved: dict | None = None):
        """-> (embedding value or in-flight DeploymentResponse, (h, w), "hit" | "miss").

        With a shared cache (and `refs`) a cached embedding is an `EmbeddingRef`: only its
        header is read here; the model replicas hold or read the value themselves
        (deployments/embeddings.py). Otherwise it is the value's bytes.

        CPU work on the image (hashing a large body, decoding) runs in a thread: the event loop
        keeps answering other requests and /healthz meanwhile."""
        info = await self.info()
        sam_id = info["model"]["sam"]
        if image is not None and img_id is None:
            big = len(image) > 2**20  # sha256 runs ~1 GB/s: below 1 MiB a thread costs more
            img_id = await asyncio.to_thread(hash_image, image) if big else hash_image(image)
        key = embedding_key(sam_id, img_id)
        t = time.perf_counter()
        if refs and self.cache.store.shared:
            header = await self.cache.get_embedding_header(key, sam_id)
            found = None if header is None else EmbeddingRef(key, header)
        else:
            found = await self.cache.get_embedding_blob(key, sam_id)
        timings["cache"] = (time.perf_counter() - t) * 1000.0
        self.embedding_lookups["miss" if found is None else "hit"] += 1
        if found is not None:
            h, w = header_of(found)["original_size"]
            return found, (h, w), "hit", img_id
        if image is None:
            raise NotFoundError(f"unknown image_id {img_id}: it was never embedded here, or its "
                                "embedding expired from the cache; send the image itself")
        t = time.perf_counter()
        # pixel limit checked from the header first, inside decode_image_bytes
        rgb, _ = await asyncio.to_thread(decode_image_bytes, image, self.max_pixels)
        timings["image_decode"] = (time.perf_counter() - t) * 1000.0
        # too thin for SAM's resize: 422 here, before it can join (and fail) an encoder batch
        check_model_input(rgb.shape[:2], info["image_size"])
        if moved is not None and key not in self._inflight:  # this request makes the call
            moved["encoder"] = payload_bytes((rgb, img_id))
        if not refs and self.cache.store.shared:
            # resent because a replica could not read the cache: the value itself, whatever the
            # encoder's own view of Redis (its write may succeed where a replica's read failed)
            if moved is not None:
                moved["encoder"] = payload_bytes((rgb, img_id))
            return self.encoder.remote(rgb, img_id, True), rgb.shape[:2], "miss", img_id
        return self._encode(rgb, img_id, key), rgb.shape[:2], "miss", img_id

    def _encode(self, rgb, img_id: str, key: str) -> DeploymentResponse:
        """Single-flight: concurrent requests for one new image share one encoder call."""
        resp = self._inflight.get(key)
        if resp is None:
            resp = self.encoder.remote(rgb, img_id)
            self._inflight[key] = resp
            self._background(self._settle(key, resp))
        return resp

    async def _settle(self, key: str, resp: DeploymentResponse) -> None:
        try:
            blob = await resp
            if not self.cache.store.shared:
                await self.cache.store.set(key, blob)
        except Exception:  # noqa: BLE001 - the requests waiting on it report the error
            pass
        finally:
            if self._inflight.get(key) is resp:  # not a fresh call made since (a retry's)
                del self._inflight[key]

    async def _forget_failed_encode(self, key: str) -> None:
        """Before a retry: drop the single-flight entry of an encoder call that failed (its
        `_settle` may not have run yet), so the retry makes a fresh call. A live entry (another
        request's retry) is shared, as single-flight does."""
        resp = self._inflight.get(key)
        if resp is None:
            return
        try:
            await resp
        except Exception:  # noqa: BLE001 - it failed: forget it
            if self._inflight.get(key) is resp:
                del self._inflight[key]

    # --- segment ----------------------------------------------------------------------------

    async def segment_one(self, req: SegmentRequest, rid: str) -> dict:
        """One segment request, tried again once if a model replica died under it: every step
        is idempotent, and Serve routes the retry to a live (or the restarted) replica."""
        try:
            return await self._segment_once(req, rid)
        except EmbeddingUnavailable as exc:
            # a replica could not read the embedding from the cache (evicted, Redis down): the
            # same request again, with the embedding's bytes (or encoded afresh)
            logging.getLogger("biprompt.serve").info(
                "segment %s: %s; sending the embedding itself", rid, exc)
            self.embedding_resends += 1
            return await self._segment_once(req, rid, refs=False)
        except Exception as exc:
            gone = lost_replica(exc)
            if gone is None:
                raise
            log_retry(f"segment {rid}", gone)
            self.replica_retries += 1
        if req.image is not None or req.image_id is not None:
            info = await self.info()
            img_id = hash_image(req.image) if req.image is not None else req.image_id
            await self._forget_failed_encode(embedding_key(info["model"]["sam"], img_id))
        return await self._segment_once(req, rid)

    async def _segment_once(self, req: SegmentRequest, rid: str, refs: bool = True) -> dict:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        moved: dict[str, int] = {}
        info = await self.info()
        img_id = hash_image(req.image) if req.image is not None else req.image_id
        # The cached text mask is looked up while the embedding is: both are keyed by the image.
        lookup = None
        if req.text is not None and req.mode != "point" and info["text_model"]:
            lookup = asyncio.ensure_future(self._cached_mask(img_id, req.text, info))
        try:
            emb, size, cache_state, img_id = await self._embedding(req.image, img_id, timings,
                                                                   refs, moved)
            mask_input = await self._mask_input(req, img_id, info)
            prompt = make_prompt(size, req.points or None, req.point_labels, box=req.box,
                                 text=req.text, mode=req.mode, mask_input=mask_input,
                                 multimask=req.multimask)
        except BaseException:
            if lookup is not None:
                lookup.cancel()
            raise
        # Each model's answer is awaited here, not handed on to the next deployment as a
        # DeploymentResponse: when a replica's node is lost, Serve reports a chained argument as
        # "temporarily unavailable" and retries the *next* call without end (seen with the
        # Selector on a removed node: requests hung until the client gave up). Awaited here, the
        # failure is ours to see, and segment_one retries it. In the throughput-optimized mode
        # the router awaited those arguments in this replica anyway.
        emb = await _settled(emb)
        if "encoder" in moved:  # the encoder took the decoded image; this is its answer
            moved["encoder"] += payload_bytes(emb)
        reference, reference_cache = None, None
        if req.reference is not None and prompt.mode != "point":
            reference, reference_cache = await self._reference_mask(
                emb, req.reference, img_id, info, timings, refs, moved)
        elif prompt.mode == "reference":
            raise InvalidPromptError("mode 'reference' needs a `reference`")
        t_models = time.perf_counter()
        want_logits = req.logits != "none"
        has_points = bool(len(prompt.points)) or prompt.box is not None
        spec = {"mode": prompt.mode, "mask_format": req.mask_format,
                "return_candidates": req.return_candidates,
                "return_text_mask": req.return_text_mask or req.return_expert_masks,
                "return_expert_masks": req.return_expert_masks, "logits": req.logits}
        text, text_cache = None, None
        if prompt.text is not None and prompt.mode != "point":
            if not info["text_model"]:
                raise InvalidInputError("this server has no text model: use mode 'point' or "
                                        "leave out text")
            text, text_cache = await self._text_mask(emb, prompt.text, img_id, info, lookup)
        if has_points and "miss" not in (text_cache, reference_cache):
            # every expert mask is known already (cached, or none asked): the join runs on the
            # PointDecoder, next to the candidates; no Selector hop, no candidate masks sent
            experts = {"text": text, **({"reference": reference} if reference is not None else {})}
            if refs and self.cache.store.shared:
                # a cached mask by its key: the PointDecoder reads it from Redis itself
                experts = {k: self._by_key(v) for k, v in experts.items()}
            args = (emb, prompt, want_logits, {"spec": spec, "experts": experts})
            out = (await self._near(self.decoder, emb).remote(*args))["joined"]
            moved["points"] = payload_bytes(args) + payload_bytes(out)
            timings["models_wait"] = (time.perf_counter() - t_models) * 1000.0  # and the join
        else:
            points = None
            if has_points:
                points = self._near(self.decoder, emb).remote(emb, prompt, want_logits)
                moved["points"] = payload_bytes((emb, prompt, want_logits))
            if text_cache == "miss":
                moved["text"] = payload_bytes((emb, prompt.text))
            points, text, reference = await asyncio.gather(_settled(points), _settled(text),
                                                           _settled(reference))
            if points is not None:
                moved["points"] += payload_bytes(points)
            if text_cache == "miss":
                moved["text"] += payload_bytes(text)
            if reference_cache == "miss":
                moved["reference"] = moved.get("reference", 0) + payload_bytes(reference)
            t_selector = time.perf_counter()
            # experts go as keyword arguments: a new expert is one more keyword, the Selector's
            # signature stays
            experts = {"text": text, **({"reference": reference} if reference is not None else {})}
            out = await self.selector.remote(points, spec, **experts)
            moved["selector"] = payload_bytes((points, spec, experts)) + payload_bytes(out)
            # where a request's time goes between the deployments: the wall time this replica
            # waited for the models (from dispatch to both answers) and for the Selector, next
            # to the compute each reports (point_decoder, text_model, selector): the rest is
            # hops and queues
            timings["models_wait"] = (t_selector - t_models) * 1000.0
            timings["selector_wait"] = (time.perf_counter() - t_selector) * 1000.0
        if cache_state == "miss":
            timings["encoder"] = header_of(emb).get("encode_ms", 0.0)
        timings.update(out.pop("timings_ms"))
        out.update(await self._logits_out(out.pop("logits", None), req.logits, img_id, info))
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        moved["total"] = sum(moved.values())
        self.moved["requests"] += 1
        self.moved["bytes"] += moved["total"]
        h, w = size
        return {"request_id": rid, "image_id": img_id, "width": w, "height": h,
                "mode": prompt.mode, "mask_format": req.mask_format, **out,
                "cache": cache_state, "text_cache": text_cache,
                "reference_cache": reference_cache, "timings_ms": timings,
                "bytes_moved": moved, "model": info["model"]}

    @staticmethod
    def _by_key(value):
        """A cached expert mask (as `_cached_mask` returns it) as a `CachedMask`; else as is."""
        if isinstance(value, dict) and "key" in value and "model_id" in value:
            return CachedMask(value["key"], value["model_id"])
        return value

    @staticmethod
    def _near(handle: DeploymentHandle, emb) -> DeploymentHandle:
        """The handle routed to a replica that holds the embedding (Serve's model multiplexing,
        keyed by its cache key) when it goes by reference."""
        if isinstance(emb, EmbeddingRef):
            return handle.options(multiplexed_model_id=emb.key)
        return handle

    # --- refinement: the previous mask's low-res logits -------------------------------------

    async def _mask_input(self, req: SegmentRequest, img_id: str, info: dict):
        """The request's mask_input as LxL float32 logits (None without one): sent raw, or named
        by the `logits_id` of an earlier answer on the same image."""
        if req.mask_input is not None:
            n = len(req.mask_input) // 2
            side = int(round(n ** 0.5))
            if len(req.mask_input) % 2 or side * side != n:
                raise InvalidPromptError(f"mask_input is {len(req.mask_input)} bytes: send LxL "
                                        "float16 logits (2 x L x L bytes, L = logits_size)")
            return np.frombuffer(req.mask_input, dtype="<f2").reshape(side, side)
        if req.mask_input_id is None:
            return None
        blob = await self.cache.store.get(logits_key(info["model"]["sam"], req.mask_input_id))
        if blob is None:
            raise NotFoundError(f"unknown mask_input_id {req.mask_input_id}: it expired (kept "
                                f"{LOGITS_TTL_S // 60} min) or came from another server; send the "
                                "logits themselves, or click anew without mask_input_id")
        try:
            logits, owner = unpack_logits(blob, info["model"]["sam"])
        except CacheFormatError:
            raise NotFoundError(f"mask_input_id {req.mask_input_id} holds no logits this model "
                                "reads; send the logits themselves") from None
        if owner != img_id:
            raise InvalidPromptError(f"mask_input_id {req.mask_input_id} belongs to another image")
        return logits

    async def _logits_out(self, logits, want: str, img_id: str, info: dict) -> dict:
        """The reply's logits fields: a server-side handle ('id') or the logits ('raw')."""
        if logits is None or want == "none":
            return {}
        logits = np.asarray(logits, dtype=np.float16)
        if want == "raw":
            return {"logits": logits.astype("<f2").tobytes(), "logits_size": int(logits.shape[0])}
        handle = uuid.uuid4().hex
        await self.cache.store.set(logits_key(info["model"]["sam"], handle),
                                   pack_logits(logits, info["model"]["sam"], img_id),
                                   ttl_s=LOGITS_TTL_S)
        return {"logits_id": handle, "logits_size": int(logits.shape[0])}

    async def _cached_mask(self, img_id: str, text: str, info: dict):
        """The text mask's key and its cached value (COCO RLE, as the Selector reads it)."""
        key, model_id = text_mask_key(info["model"]["sam"], info["model"]["text"], img_id,
                                      text), info["model"]["text"]
        rle = await self.cache.get_mask_rle(key, model_id)
        return key, None if rle is None else {"rle": [rle], "shape": tuple(rle["size"]),
                                              "key": key, "model_id": model_id}

    async def _text_mask(self, emb, text: str, img_id: str, info: dict, lookup=None):
        key, mask = await (lookup or self._cached_mask(img_id, text, info))
        if mask is not None:
            return mask, "hit"
        resp = self._near(self.text, emb).remote(emb, text, key)
        if not self.cache.store.shared:
            self._background(self._remember_mask(key, resp, info["model"]["text"]))
        return resp, "miss"

    async def _remember_mask(self, key: str, resp: DeploymentResponse, model_id: str) -> None:
        try:
            out = await resp
            await self.cache.store.set(key, pack_mask_rle(out["mask"]["rle"][0], model_id))
        except Exception:  # noqa: BLE001 - the request itself reports the error
            pass

    # --- the reference expert ---------------------------------------------------------------

    async def _reference_mask(self, emb, ref, img_id: str, info: dict, timings: dict,
                              refs: bool, moved: dict):
        """-> (the reference expert's mask: cached RLE or a pending reply, "hit" | "miss").
        The reference image's embedding comes the way the target's does (cache, else the
        encoder, single-flight); its annotation is checked here, so a bad one is this request's
        422 before any model runs."""
        if not info.get("reference_model") or self.reference is None:
            raise InvalidInputError("this server has no reference model: leave out `reference`")
        ref_timings: dict[str, float] = {}
        ref_emb, (h, w), _, ref_id = await self._embedding(ref.image, ref.image_id, ref_timings,
                                                           refs, None)
        timings["reference_image"] = sum(ref_timings.values())
        body: dict[str, Any] = {}
        if ref.mask is not None:
            if tuple(ref.mask.size) != (h, w):
                raise InvalidPromptError(f"the reference mask is {ref.mask.size[1]}x"
                                         f"{ref.mask.size[0]}; the reference image is {w}x{h}")
            try:
                from pycocotools import mask as coco

                m = coco.decode({"size": list(ref.mask.size),
                                 "counts": ref.mask.counts.encode("ascii")})
            except Exception:  # noqa: BLE001 - pycocotools raises several kinds
                raise InvalidPromptError("the reference mask is not valid COCO RLE") from None
            if not m.any():
                raise InvalidPromptError("the reference mask is empty: annotate the object")
            body["mask"] = pack_rle(m.astype(bool))
            kind, payload = "mask", ref.mask.counts.encode("ascii")
        else:
            p = make_prompt((h, w), ref.points or None, ref.point_labels, box=ref.box,
                            mode="point")  # a bad point or box: 422 here
            body.update(points=p.points.tolist() if len(p.points) else None,
                        labels=p.labels.tolist() if len(p.points) else None,
                        box=None if p.box is None else p.box.tolist())
            kind, payload = "prompt", repr((body["points"], body["labels"], body["box"])).encode()
        sam_id, ref_model = info["model"]["sam"], info["model"]["reference"]
        annotation = annotation_key(ref_id, kind, payload)
        mask_key = reference_mask_key(sam_id, ref_model, img_id, annotation)
        cached = await self.cache.get_mask_rle(mask_key, ref_model, "reference_mask")
        if cached is not None:
            return {"rle": [cached], "shape": tuple(cached["size"]), "key": mask_key,
                    "model_id": ref_model}, "hit"
        body.update(key=reference_key(sam_id, ref_model, annotation),
                    embedding=await _settled(ref_emb))
        args = (emb, body, mask_key)
        moved["reference"] = payload_bytes(args)
        resp = self._near(self.reference, emb).remote(*args)
        if not self.cache.store.shared:
            self._background(self._remember_mask(mask_key, resp, ref_model))
        return resp, "miss"

    # --- routes -----------------------------------------------------------------------------

    @api.post("/v1/segment", response_model=SegmentResponse,
              responses=responses(SegmentResponse),
              openapi_extra=body_doc(SegmentRequest))
    async def segment(self, request: Request):
        """Segment one object from points (and/or a box) and a referring expression."""
        req = await self._parse(request, SegmentRequest)
        return self._reply(request, await self._guard(self.segment_one(req, request.state.request_id)))

    @api.post("/v1/segment/batch", response_model=BatchResponse,
              responses=responses(BatchResponse),
              openapi_extra=body_doc(BatchRequest))
    async def segment_batch(self, request: Request):
        """Many segment requests in one call: results (or per-item errors) in input order. Items
        on the same image share one encoder pass; an invalid item gets its own 422."""
        body = await self._parse(request, BatchEnvelope)
        if len(body.items) > self.max_items:
            raise PayloadTooLargeError(f"{len(body.items)} items; at most {self.max_items} per "
                                       "batch call")
        rid = request.state.request_id

        async def invalid(err, item_rid: str) -> dict:
            return {"status": err.status_code, "result": None, "error": error_info(err, item_rid)}

        work = []
        for i, raw in enumerate(body.items):
            try:
                work.append(self._item(SegmentRequest.model_validate(raw), f"{rid}/{i}"))
            except ValidationError as exc:
                work.append(invalid(as_api_error(exc), f"{rid}/{i}"))
        results = await asyncio.gather(*work)
        return self._reply(request, {"request_id": rid, "results": results})

    async def _item(self, req: SegmentRequest, rid: str) -> dict:
        try:
            return {"status": 200, "result": await self._guard(self.segment_one(req, rid)),
                    "error": None}
        except Exception as exc:  # noqa: BLE001 - one bad item must not fail the batch
            err = as_api_error(exc)
            return {"status": err.status_code, "result": None, "error": error_info(err, rid)}

    @api.post("/v1/embed", response_model=EmbedResponse, responses=responses(EmbedResponse),
              openapi_extra=body_doc(EmbedRequest))
    async def embed(self, request: Request):
        """Precompute an image's embedding; later requests can send `image_id` instead."""
        req = await self._parse(request, EmbedRequest)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        emb, (h, w), state, img_id = await self._guard(self._embedding(req.image, None, timings))
        if state == "miss":
            timings["encoder"] = header_of(await self._guard(emb)).get("encode_ms", 0.0)
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        info = await self.info()
        return self._reply(request, {"request_id": request.state.request_id, "image_id": img_id,
                                     "width": w, "height": h, "cache": state,
                                     "timings_ms": timings, "model": info["model"]})

    @api.get("/v1/models", response_model=ModelInfo, responses=responses(ModelInfo))
    async def models(self, request: Request):
        """The models this server runs, every limit it enforces and its cache."""
        self._auth(request)
        info = await self.info()
        text = self.args.profile().text if info["text_model"] else None
        limits = {
            "max_body_bytes": self.max_body,
            "max_image_pixels": self.max_pixels,
            "max_batch_items": self.max_items,
            "max_points": min(MAX_POINTS, MAX_WIRE_POINTS),
            # the wire refuses longer text at once (422 invalid_input); the text model's own
            # limits, in characters and in tokens, are checked after (422 invalid_prompt)
            "max_wire_text_chars": MAX_TEXT_CHARS,
            "max_text_chars": min(MAX_TEXT_CHARS, text.max_chars if text else MODEL_TEXT_CHARS),
            "max_text_tokens": text.max_tokens if text else MAX_TEXT_TOKENS,
            "max_nesting_depth": MAX_NESTING_DEPTH,
        }
        return self._reply(request, {**info, "limits": limits, "cache": self.cache.store.describe()})

    @api.get("/healthz")
    async def health(self):
        """Liveness and cache state; needs no API key."""
        ok = await self.cache.store.ping()
        return {"status": "ok", "cache": self.cache.store.describe(), "cache_ok": ok}

    # --- Label Studio's ML backend protocol (deployments/label_studio.py) -------------------
    # Label Studio's shapes, not ours: out of /openapi.json. Auth: LabelStudioBackend.authorize.

    async def _label_studio_body(self, request: Request):
        self.label_studio.authorize(request.headers.get("authorization"))
        return parse_json(await self._body(request))

    @api.post("/label-studio/predict", include_in_schema=False)
    async def label_studio_predict(self, request: Request):
        """Interactive pre-annotation: smart keypoints / rectangle / text -> a brush mask."""
        body = await self._label_studio_body(request)
        return await self.label_studio.predict(body, request.state.request_id)

    @api.post("/label-studio/setup", include_in_schema=False)
    async def label_studio_setup(self, request: Request):
        return await self.label_studio.setup(await self._label_studio_body(request))

    @api.post("/label-studio/webhook", include_in_schema=False)
    async def label_studio_webhook(self, request: Request):
        return self.label_studio.webhook(await self._label_studio_body(request))

    @api.get("/label-studio/health", include_in_schema=False)
    @api.get("/label-studio/", include_in_schema=False)
    async def label_studio_health(self, request: Request):
        self.label_studio.authorize(request.headers.get("authorization"))
        return self.label_studio.health()

    async def _guard(self, awaitable):
        try:
            return await awaitable
        except Exception as exc:  # noqa: BLE001
            raise as_api_error(exc) from None


"""What the sync and async clients share: configuration, request bodies, response parsing, the
retry policy and the planning of `segment_many`. No I/O happens here."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from . import rle
from .errors import (
    APIConnectionError,
    APITimeoutError,
    BiPromptClientError,
    ServerError,
    error_from_response,
)
from .images import load_image_bytes
from .results import BatchError, Segmentation
from .schema import JSON, MSGPACK, SegmentRequest, WireError, decode_body, encode_body, media_type

__all__ = ["BaseClient", "Retry", "SEGMENT_KEYS"]

Wire = Literal["msgpack", "json"]
RETRY_STATUS = frozenset({408, 429, 502, 503, 504})
_RETRY_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
USER_AGENT = "biprompt-client/0.1"

# segment() keyword -> wire field
SEGMENT_KEYS = {
    "image_id": "image_id", "points": "points", "labels": "point_labels",
    "point_labels": "point_labels", "box": "box", "text": "text", "mode": "mode",
    "mask_format": "mask_format", "return_candidates": "return_candidates",
    "return_text_mask": "return_text_mask", "mask_input_id": "mask_input_id",
    "mask_input": "mask_input", "logits": "logits", "multimask": "multimask",
    "reference": "reference", "return_expert_masks": "return_expert_masks",
}
REFERENCE_KEYS = ("image", "image_id", "mask", "points", "labels", "point_labels", "box")


@dataclass
class Retry:
    """An exchange to repeat: after `delay` seconds, or at once with JSON when `fallback`."""

    delay: float = 0.0
    error: BaseException | None = None
    fallback: bool = False


@dataclass
class Plan:
    """segment_many's work list: per item the wire fields (no image) and the image's sha256."""

    fields: list[dict[str, Any] | None]
    keys: list[str | None]
    images: dict[str, bytes]
    uses: Counter[str]
    results: list[Segmentation | BatchError | None]
    image_ids: dict[str, str] = field(default_factory=dict)
    embed_errors: dict[str, BaseException] = field(default_factory=dict)
    embed_hits: int = 0
    resends: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_embed(self) -> list[str]:
        """Images used by two or more items: embedded once, then referenced by image_id."""
        return [k for k, n in self.uses.items() if n > 1]

    def payloads(self, i: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(first payload, payload to re-send on 404 or None) for item i."""
        fields, key = self.fields[i], self.keys[i]
        assert fields is not None
        if key is None:  # the caller gave an image_id
            return fields, None
        with_image = {**fields, "image": self.images[key]}
        if key in self.image_ids:
            return {**fields, "image_id": self.image_ids[key]}, with_image
        return with_image, None

    def stats(self, seconds: float) -> dict[str, Any]:
        done = [r for r in self.results if r is not None]
        segs = [r for r in done if isinstance(r, Segmentation)]
        return {
            "items": len(self.results), "ok": len(segs), "errors": len(done) - len(segs),
            "images": len(self.images), "embed_calls": len(self.image_ids) + len(self.embed_errors),
            "embed_cache_hits": self.embed_hits, "resends": self.resends,
            "cache_hits": sum(s.cache_hit for s in segs),
            "text_cache_hits": sum(bool(s.text_cache_hit) for s in segs),
            "seconds": round(seconds, 4),
        }


class BaseClient:
    """Configuration and the I/O-free half of every call."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int,
                 wire: Wire, backoff_base: float, backoff_max: float,
                 rng: random.Random | None) -> None:
        if wire not in ("msgpack", "json"):
            raise ValueError(f"wire must be 'msgpack' or 'json', got {wire!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("BIPROMPT_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.wire: Wire = wire
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self.last_batch_stats: dict[str, Any] | None = None

    @property
    def media(self) -> str:
        return MSGPACK if self.wire == "msgpack" else JSON

    def _client_kwargs(self, transport: Any) -> dict[str, Any]:
        headers = {"User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        kwargs: dict[str, Any] = {"base_url": self.base_url, "timeout": self.timeout,
                                  "headers": headers}
        if transport is not None:
            kwargs["transport"] = transport
        return kwargs

    def _prepare(self, payload: Any) -> tuple[bytes | None, dict[str, str]]:
        headers = {"Accept": self.media}
        if payload is None:
            return None, headers
        headers["Content-Type"] = self.media
        return encode_body(payload, self.media), headers

    # --- retry policy -----------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` + 1 (full jitter, or Retry-After)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max * 4)
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _transport_outcome(self, exc: httpx.TransportError, attempt: int) -> Retry:
        """A Retry for a failed exchange, or raises APIConnectionError / APITimeoutError."""
        cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
        err = cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if isinstance(exc, _RETRY_TRANSPORT) and attempt < self.max_retries:
            return Retry(self._backoff(attempt), err)
        raise err from exc

    def _response_outcome(self, resp: httpx.Response, attempt: int, switched: bool) -> Any:
        """The decoded body of a 2xx response, a Retry, or raises the mapped error."""
        status, rid = resp.status_code, resp.headers.get("x-request-id")
        can_fall_back = self.wire == "msgpack" and not switched
        if status == 415 and can_fall_back:
            self.wire = "json"
            return Retry(fallback=True)
        media = media_type(resp.headers.get("content-type"))
        body: Any = None
        try:
            body = decode_body(resp.content, media) if resp.content else None
        except WireError as exc:
            if media == MSGPACK and can_fall_back:
                self.wire = "json"
                return Retry(fallback=True)
            if resp.is_success:
                raise ServerError(f"could not parse the response: {exc}", status_code=status,
                                  type="invalid_response", request_id=rid) from None
        if resp.is_success:
            if not isinstance(body, Mapping):
                raise ServerError(f"expected an object in the response, got {type(body).__name__}",
                                  status_code=status, type="invalid_response", request_id=rid)
            return body
        retry_after = _retry_after(resp.headers.get("retry-after"))
        err = error_from_response(status, body if isinstance(body, Mapping) else None, rid,
                                  retry_after=retry_after, text=resp.text if body is None else None)
        retryable = status in RETRY_STATUS or (status == 500 and not _our_error_body(body))
        if retryable and attempt < self.max_retries:
            return Retry(self._backoff(attempt, retry_after), err)
        raise err

    # --- request bodies ---------------------------------------------------------------------

    def _segment_fields(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """segment() keywords -> wire fields (without `image`; labels -> point_labels)."""
        unknown = sorted(set(request) - set(SEGMENT_KEYS) - {"image"})
        if unknown:
            raise ValueError(f"unknown segment argument(s) {unknown}; "
                             f"expected some of {sorted({'image', *SEGMENT_KEYS})}")
        out: dict[str, Any] = {}
        for key, value in request.items():
            if key == "image" or value is None:
                continue
            wire_key = SEGMENT_KEYS[key]
            if wire_key == "points":
                value = [[float(x), float(y)] for x, y in value]
            elif wire_key == "point_labels":
                value = [int(v) for v in value]
            elif wire_key == "box":
                value = [float(v) for v in value]
            elif wire_key == "mask_input" and not isinstance(value, bytes):
                value = logits_bytes(value)  # an LxL array of logits
            elif wire_key == "reference":
                value = reference_fields(value)
            out[wire_key] = value
        return out

    def _segment_payload(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A full segment body: validated against the wire schema before anything is sent."""
        fields = self._segment_fields(request)
        if request.get("image") is not None:
            fields["image"] = load_image_bytes(request["image"])
        SegmentRequest.model_validate(fields)  # raises pydantic.ValidationError (a ValueError)
        return fields

    def _batch_prepare(self, requests: Sequence[Mapping[str, Any]],
                       ) -> tuple[list[dict[str, Any]], list[Segmentation | BatchError | None]]:
        """(payloads of the valid items, results with a BatchError for each invalid one)."""
        payloads: list[dict[str, Any]] = []
        results: list[Segmentation | BatchError | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                payloads.append(self._segment_payload(req))
            except Exception as exc:  # one bad item must not stop the others
                results[i] = BatchError(exc, index=i)
        return payloads, results

    def _batch_merge(self, body: Mapping[str, Any] | None,
                     results: list[Segmentation | BatchError | None],
                     ) -> list[Segmentation | BatchError]:
        """Fill the open slots of `results` with the items of a BatchResponse, in order."""
        items = list((body or {}).get("results") or [])
        open_slots = [i for i, r in enumerate(results) if r is None]
        if len(items) != len(open_slots):
            raise ServerError(f"batch response has {len(items)} results for {len(open_slots)} "
                              "items", type="invalid_response")
        for i, item in zip(open_slots, items, strict=True):
            if item.get("status") == 200 and item.get("result") is not None:
                results[i] = Segmentation.from_response(item["result"])
            else:
                err = error_from_response(int(item.get("status") or 500),
                                          {"error": item.get("error") or {}}, None)
                results[i] = BatchError(err, index=i)
        return [r for r in results if r is not None]

    def _plan(self, requests: Sequence[Mapping[str, Any]]) -> Plan:
        """Load and hash every item's image once; bad items become BatchErrors right away."""
        n = len(requests)
        plan = Plan([None] * n, [None] * n, {}, Counter(), [None] * n)
        memo: dict[Any, str] = {}  # path or id(object) -> sha256, for images given repeatedly
        for i, req in enumerate(requests):
            try:
                fields = self._segment_fields(req)
                image = req.get("image")
                if image is None and "image_id" not in fields:
                    raise ValueError("give `image` or `image_id`")
                if image is not None and "image_id" in fields:
                    raise ValueError("give exactly one of `image` and `image_id`")
                SegmentRequest.model_validate({"image_id": "0" * 64, **fields})
                if image is not None:
                    mkey = str(image) if isinstance(image, (str, os.PathLike)) else id(image)
                    key = memo.get(mkey)
                    if key is None:
                        data = load_image_bytes(image)
                        key = memo[mkey] = hashlib.sha256(data).hexdigest()
                        plan.images.setdefault(key, data)
                    plan.keys[i] = key
                    plan.uses[key] += 1
                plan.fields[i] = fields
            except Exception as exc:  # one bad item must not stop the others
                plan.results[i] = BatchError(exc, index=i)
        return plan

    def _note_embed(self, plan: Plan, key: str, outcome: Mapping[str, Any] | BaseException) -> None:
        with plan.lock:
            if isinstance(outcome, BaseException):
                plan.embed_errors[key] = outcome
            else:
                plan.image_ids[key] = str(outcome["image_id"])
                plan.embed_hits += outcome.get("cache") == "hit"

    def _embed_failed(self, plan: Plan, i: int) -> BatchError | None:
        key = plan.keys[i]
        if key is not None and key in plan.embed_errors:
            return BatchError(plan.embed_errors[key], index=i)
        return None


def reference_fields(ref: Mapping[str, Any]) -> dict[str, Any]:
    """segment(reference={...}) -> the wire's reference: `image` (path, bytes, PIL, array) or
    `image_id`; the object as `mask` (an HxW bool array, or COCO RLE) or `points`/`labels`
    and/or `box`."""
    if not isinstance(ref, Mapping):
        raise ValueError("reference must be a dict: {image | image_id, mask | points | box}")
    unknown = sorted(set(ref) - set(REFERENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown reference key(s) {unknown}; expected some of "
                         f"{sorted(REFERENCE_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in ref.items():
        if value is None:
            continue
        if key == "image":
            value = load_image_bytes(value)
        elif key == "mask" and not isinstance(value, Mapping):
            value = rle.encode(np.asarray(value, dtype=bool))
        elif key == "points":
            value = [[float(x), float(y)] for x, y in value]
        elif key in ("labels", "point_labels"):
            key, value = "point_labels", [int(v) for v in value]
        elif key == "box":
            value = [float(v) for v in value]
        out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def logits_bytes(logits: Any) -> bytes:
    """LxL low-res logits (a numpy array or nested lists) -> the wire's float16 bytes."""
    arr = np.asarray(logits, dtype="<f2")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"mask_input must be LxL logits, got shape {list(arr.shape)}")
    return arr.tobytes()


def _our_error_body(body: Any) -> bool:
    """Whether an error reply carries the server's own body, {"error": {"type", ...}}. Every
    error the app answers does; a 500 without it came from in front of the app (Serve's proxy
    answering for an Ingress replica that died mid-request), and the request never got an
    answer: worth retrying, as every v1 route is idempotent."""
    error = body.get("error") if isinstance(body, Mapping) else None
    return isinstance(error, Mapping) and "type" in error


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: fall back to the jittered backoff
    return seconds if seconds == seconds else None  # NaN


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, BiPromptClientError) and exc.status_code == 404

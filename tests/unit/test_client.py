"""Tests for the light client SDK (biprompt_client.client and friends), against an in-process
fake of the v1 API on httpx.MockTransport: no network, no server, no sleeping. The fake speaks
the real wire format (encode_body / decode_body, rle.encode)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import pickle
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from biprompt_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncBiPromptClient,
    AuthenticationError,
    BatchError,
    BiPromptClient,
    BiPromptClientError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    Segmentation,
    ServerError,
    error_from_response,
    image_size,
    load_image_bytes,
    rle,
)
from biprompt_client.schema import JSON, MSGPACK, decode_body, encode_body, media_type
from PIL import Image

MODEL = {"sam": "sam_vit_t-test", "text": "evf-test"}


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def expected_mask(h: int, w: int, points: list | None, shift: int = 0) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    if points:
        x, y = (int(v) for v in points[0])
        m[max(0, y - 4 + shift) : y + 4 + shift, max(0, x - 4) : x + 4] = True
    else:
        m[h // 4 : h // 2, w // 4 : w // 2] = True
    return m


@dataclass
class Call:
    method: str
    path: str
    headers: httpx.Headers
    body: Any
    raw: bytes


class FakeServer:
    """A v1 API stand-in. `script[path]` holds canned responses (or callables) served first."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.images: dict[str, tuple[int, int]] = {}
        self.evicted: set[str] = set()
        self.script: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        self.n = 0

    def paths(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        media_in = media_type(request.headers.get("content-type"))
        body = decode_body(request.content, media_in) if request.content else None
        with self.lock:
            self.calls.append(Call(request.method, request.url.path, request.headers, body,
                                   request.content))
            canned = self.script.get(request.url.path)
            canned = canned.pop(0) if canned else None
        if canned is not None:
            return canned(request) if callable(canned) else canned
        return self.route(request)

    def route(self, request: httpx.Request) -> httpx.Response:
        """The default behaviour, without recording the call."""
        media_in = media_type(request.headers.get("content-type"))
        body = decode_body(request.content, media_in) if request.content else None
        path = request.url.path
        with self.lock:
            self.n += 1
            rid = f"req-{self.n}"
        out = MSGPACK if "msgpack" in request.headers.get("accept", "") else JSON
        if path == "/v1/embed":
            img_id, (h, w) = self._remember(body["image"])
            return reply(200, {"request_id": rid, "image_id": img_id, "width": w, "height": h,
                               "cache": "miss", "timings_ms": {"total": 1.0}, "model": MODEL},
                         out, rid)
        if path == "/v1/segment":
            res = self.segment(body, rid)
            if "error" in res:
                return reply(res.pop("status"), res, out, rid)
            return reply(200, res, out, rid)
        if path == "/v1/segment/batch":
            items = []
            for i, it in enumerate(body["items"]):
                res = self.segment(it, f"{rid}/{i}")
                if "error" in res:
                    items.append({"status": res.pop("status"), "result": None, **res})
                else:
                    items.append({"status": 200, "result": res, "error": None})
            return reply(200, {"request_id": rid, "results": items}, out, rid)
        if path == "/v1/models":
            return reply(200, {"model": MODEL, "sam_variant": "tiny", "image_size": 64,
                               "text_model": True, "limits": {}, "cache": "memory"}, out, rid)
        if path == "/healthz":
            return reply(200, {"status": "ok", "cache": "memory", "cache_ok": True}, JSON, rid)
        return err_reply(404, "http_error", "Not Found", out, rid)

    def _remember(self, image: bytes) -> tuple[str, tuple[int, int]]:
        img_id = hashlib.sha256(image).hexdigest()
        size = image_size(image)
        with self.lock:
            self.images[img_id] = size
            self.evicted.discard(img_id)
        return img_id, size

    def segment(self, req: dict, rid: str) -> dict:
        def error(status: int, kind: str, msg: str) -> dict:
            return {"status": status, "error": {"type": kind, "message": msg, "request_id": rid}}

        if req.get("image") is not None:
            img_id, (h, w) = self._remember(req["image"])
            cache = "miss"
        else:
            img_id = req["image_id"]
            if img_id not in self.images or img_id in self.evicted:
                return error(404, "not_found", f"unknown image_id {img_id}")
            (h, w), cache = self.images[img_id], "hit"
        if req.get("text") == "bad":
            return error(422, "invalid_prompt", "text is empty after normalisation")
        fmt = req.get("mask_format", "rle")
        points = req.get("points")

        def enc(m: np.ndarray) -> Any:
            return rle.encode(m) if fmt == "rle" else _png(m) if fmt == "png" else None

        masks = [expected_mask(h, w, points, s) for s in (0, 1, 2)]
        text_mask = expected_mask(h, w, None) if req.get("text") else None
        cands = [{"index": i, "predicted_iou": 0.9 - i / 10,
                  "text_iou": None if text_mask is None else 0.1 * i,
                  "mask": enc(m) if req.get("return_candidates") else None}
                 for i, m in enumerate(masks)]
        return {"request_id": rid, "image_id": img_id, "width": w, "height": h,
                "mode": req.get("mode", "biprompt"), "mask_format": fmt, "mask": enc(masks[0]),
                "selected": 0, "strategy": "point", "agreement": 0.5, "candidates": cands,
                "text_mask": enc(text_mask) if req.get("return_text_mask") and
                text_mask is not None else None,
                "cache": cache, "text_cache": "miss" if req.get("text") else None,
                "timings_ms": {"total": 2.5}, "model": MODEL}


def reply(status: int, obj: Any, media: str, rid: str | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"content-type": media, **({"x-request-id": rid} if rid else {}), **(headers or {})}
    return httpx.Response(status, content=encode_body(obj, media), headers=hdrs)


def err_reply(status: int, kind: str, msg: str, media: str = JSON, rid: str | None = "rid-e",
              headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"type": kind, "message": msg, "request_id": rid}}
    return reply(status, body, media, rid, headers)


def make_images(n: int, h: int = 24, w: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(server: FakeServer, sleeps: list[float]):
    with BiPromptClient(transport=httpx.MockTransport(server), sleep=sleeps.append,
                        rng=random.Random(0), api_key="") as c:
        yield c


def run(coro_fn: Callable[[AsyncBiPromptClient], Any], server: FakeServer, **kw: Any) -> Any:
    async def main() -> Any:
        kw.setdefault("sleep", lambda s: None)
        async with AsyncBiPromptClient(transport=httpx.MockTransport(server), api_key="",
                                       **kw) as c:
            return await coro_fn(c), c

    return asyncio.run(main())


IMG = make_images(1)[0]


# --- retries --------------------------------------------------------------------------------


def test_backoff_full_jitter_schedule_is_seeded_growing_and_bounded(server, sleeps):
    server.script["/v1/segment"] = [err_reply(502, "bad_gateway", "upstream") for _ in range(6)]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=5, backoff_base=0.5,
                       backoff_max=2.0, sleep=sleeps.append, rng=random.Random(123))
    with pytest.raises(ServerError) as ei:
        c.segment(IMG, points=[[5, 5]])
    assert ei.value.status_code == 502 and ei.value.type == "bad_gateway"
    assert len(server.calls) == 6 and len(sleeps) == 5
    caps = [min(2.0, 0.5 * 2**k) for k in range(5)]
    assert caps == [0.5, 1.0, 2.0, 2.0, 2.0]
    ref = random.Random(123)
    assert sleeps == [ref.uniform(0, cap) for cap in caps]
    assert all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))

    # the ceiling of the jitter: the schedule grows exponentially, then stays at backoff_max
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    server.script["/v1/segment"] = [err_reply(504, "timeout", "slow") for _ in range(6)]
    top: list[float] = []
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=5, backoff_base=0.5,
                       backoff_max=2.0, sleep=top.append, rng=Top())
    with pytest.raises(ServerError):
        c.segment(IMG)
    assert top == caps


def test_retry_then_success(client, server, sleeps):
    server.script["/v1/segment"] = [err_reply(503, "overloaded", "busy", headers={}),
                                    err_reply(429, "rate_limited", "slow down"),
                                    err_reply(408, "timeout", "timeout")]
    seg = client.segment(IMG, points=[[10, 10]])
    assert seg.ok and len(server.calls) == 4 and len(sleeps) == 3


def test_retry_after_is_honoured_and_capped(server, sleeps):
    server.script["/v1/segment"] = [
        err_reply(503, "overloaded", "busy", headers={"Retry-After": "3"}),
        err_reply(429, "overloaded", "busy", headers={"Retry-After": "1000"}),
        err_reply(503, "overloaded", "busy", headers={"Retry-After": "-5"}),
        err_reply(503, "overloaded", "busy", headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
    ]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=4, backoff_max=8.0,
                       sleep=sleeps.append, rng=random.Random(1))
    assert c.segment(IMG).ok
    assert sleeps[:3] == [3.0, 32.0, 0.0]  # capped at backoff_max * 4; never negative
    assert 0 <= sleeps[3] <= min(8.0, 0.5 * 2**3)  # an HTTP date: the jittered backoff


def test_overloaded_after_retries_carries_retry_after(server, sleeps):
    server.script["/v1/embed"] = [
        err_reply(503, "overloaded", "queues full", headers={"Retry-After": "2"})
        for _ in range(3)]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=2, sleep=sleeps.append)
    with pytest.raises(OverloadedError) as ei:
        c.embed(IMG)
    assert ei.value.retry_after == 2.0 and ei.value.status_code == 503
    assert sleeps == [2.0, 2.0] and len(server.calls) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 413, 415, 422, 500])
def test_no_retry_on_other_statuses(client, server, sleeps, status):
    client.wire = "json"  # else 415 switches to JSON
    server.script["/v1/segment"] = [err_reply(status, "x", "no")]
    with pytest.raises(BiPromptClientError):
        client.segment(IMG)
    assert len(server.calls) == 1 and sleeps == []


def test_a_500_without_our_error_body_is_retried(client, server, sleeps):
    # what Serve's proxy answers when the Ingress replica dies under a request
    plain = httpx.Response(500, text="Internal Server Error",
                           headers={"content-type": "text/plain; charset=utf-8"})
    server.script["/v1/segment"] = [plain, plain]
    seg = client.segment(IMG, points=[[10, 10]])
    assert seg.ok and len(server.calls) == 3 and len(sleeps) == 2


def test_a_500_without_our_body_fails_after_the_retries(server, sleeps):
    server.script["/v1/segment"] = [httpx.Response(500, text="Internal Server Error")] * 3
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=2, sleep=sleeps.append)
    with pytest.raises(ServerError) as ei:
        c.segment(IMG)
    assert ei.value.status_code == 500 and len(server.calls) == 3


def test_connection_errors_are_retried_then_raised(server, sleeps):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    server.script["/v1/segment"] = [refuse] * 4
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=3, sleep=sleeps.append)
    with pytest.raises(APIConnectionError) as ei:
        c.segment(IMG)
    assert ei.value.status_code is None and "refused" in ei.value.message
    assert not isinstance(ei.value, APITimeoutError)
    assert len(server.calls) == 4 and len(sleeps) == 3


def test_timeout_is_retried_then_succeeds_or_raises(server, sleeps):
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    server.script["/v1/segment"] = [slow, slow]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=2, sleep=sleeps.append)
    assert c.segment(IMG).ok and len(sleeps) == 2
    server.script["/v1/segment"] = [slow] * 3
    with pytest.raises(APITimeoutError) as ei:
        c.segment(IMG)
    assert isinstance(ei.value, APIConnectionError) and ei.value.type == "timeout"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("media", [JSON, MSGPACK])
@pytest.mark.parametrize(("status", "kind", "cls"), [
    (401, "unauthorized", AuthenticationError),
    (404, "not_found", NotFoundError),
    (413, "payload_too_large", PayloadTooLargeError),
    (422, "invalid_input", InvalidInputError),
    (422, "invalid_image", InvalidInputError),
    (422, "invalid_prompt", InvalidInputError),
    (503, "overloaded", OverloadedError),
    (500, "internal_error", ServerError),
    (400, "http_error", BiPromptClientError),
])
def test_error_mapping(server, status, kind, cls, media):
    server.script["/v1/segment"] = [err_reply(status, kind, f"it failed: {kind}", media,
                                              rid="abc123", headers={"Retry-After": "1"})]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=0)
    with pytest.raises(cls) as ei:
        c.segment(IMG)
    err = ei.value
    assert type(err) is cls and err.status_code == status and err.type == kind
    assert err.message == f"it failed: {kind}" and err.request_id == "abc123"
    assert "abc123" in str(err) and str(status) in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.status_code, again.type, again.request_id) == (
        cls, status, kind, "abc123")


def test_error_from_response_without_a_body():
    err = error_from_response(502, None, "r1", text="<html>Bad Gateway</html>")
    assert isinstance(err, ServerError) and err.type == "internal_error"
    assert "Bad Gateway" in err.message and err.request_id == "r1"
    err = error_from_response(422, {"type": "invalid_image", "message": "m", "request_id": "b"})
    assert isinstance(err, InvalidInputError) and err.type == "invalid_image"
    assert err.request_id == "b"
    assert isinstance(error_from_response(429, None), OverloadedError)


def test_unparseable_error_body_uses_the_text(server):
    server.script["/v1/segment"] = [httpx.Response(
        500, content=b"<html>oops</html>", headers={"content-type": "text/html",
                                                    "x-request-id": "h1"})]
    c = BiPromptClient(transport=httpx.MockTransport(server), max_retries=0, wire="json")
    with pytest.raises(ServerError) as ei:
        c.segment(IMG)
    assert "oops" in ei.value.message and ei.value.request_id == "h1"


# --- wire formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["msgpack", "json"])
@pytest.mark.parametrize("fmt", ["rle", "png"])
def test_both_wires_and_mask_formats_parse(server, wire, fmt):
    c = BiPromptClient(transport=httpx.MockTransport(server), wire=wire, api_key="k3y")
    seg = c.segment(IMG, points=[[12, 8]], labels=[1], text="the cat", mask_format=fmt,
                    return_candidates=True, return_text_mask=True)
    call = server.calls[0]
    media = MSGPACK if wire == "msgpack" else JSON
    assert call.headers["content-type"] == media and call.headers["accept"] == media
    assert call.headers["authorization"] == "Bearer k3y"
    assert call.body["image"] == load_image_bytes(IMG)  # base64 in JSON, raw in msgpack
    assert call.body["points"] == [[12.0, 8.0]] and call.body["point_labels"] == [1]
    assert "image_id" not in call.body
    if wire == "json":
        assert json.loads(call.raw)["image"] == base64.b64encode(call.body["image"]).decode()
    h, w = IMG.shape[:2]
    assert (seg.height, seg.width) == (h, w) and seg.mask.shape == (h, w)
    assert seg.mask.dtype == bool
    np.testing.assert_array_equal(seg.mask, expected_mask(h, w, [[12, 8]]))
    assert (seg.rle is not None) == (fmt == "rle")
    if fmt == "rle":
        np.testing.assert_array_equal(rle.decode(seg.rle), seg.mask)
    assert [c.index for c in seg.candidates] == [0, 1, 2]
    for cand, shift in zip(seg.candidates, (0, 1, 2), strict=True):
        np.testing.assert_array_equal(cand.mask, expected_mask(h, w, [[12, 8]], shift))
    np.testing.assert_array_equal(seg.text_mask, expected_mask(h, w, None))
    assert seg.candidates[1].predicted_iou == pytest.approx(0.8)
    assert seg.candidates[2].text_iou == pytest.approx(0.2)
    assert seg.image_id == hashlib.sha256(load_image_bytes(IMG)).hexdigest()
    assert seg.cache_hit is False and seg.text_cache_hit is False
    assert seg.selected == 0 and seg.strategy == "point" and seg.agreement == 0.5
    assert seg.timings_ms == {"total": 2.5} and seg.model == MODEL
    assert seg.request_id == "req-1" and seg.raw["mask_format"] == fmt


def test_mask_format_none_and_no_text(client):
    seg = client.segment(IMG, points=[[3, 3]], mask_format="none")
    assert seg.mask is None and seg.rle is None and seg.text_mask is None
    assert seg.text_cache_hit is None and all(c.mask is None for c in seg.candidates)


def test_json_fallback_on_415(server):
    server.script["/v1/segment"] = [err_reply(415, "unsupported_media_type", "no msgpack")]
    c = BiPromptClient(transport=httpx.MockTransport(server), wire="msgpack")
    assert c.segment(IMG).ok
    assert [x.headers["content-type"] for x in server.calls] == [MSGPACK, JSON]
    assert c.wire == "json"
    c.models()
    assert server.calls[-1].headers["accept"] == JSON


def test_json_fallback_on_undecodable_msgpack(server):
    server.script["/v1/embed"] = [httpx.Response(200, content=b"\xc1\xc1garbage",
                                                 headers={"content-type": MSGPACK})]
    c = BiPromptClient(transport=httpx.MockTransport(server))
    assert c.embed(IMG) == hashlib.sha256(load_image_bytes(IMG)).hexdigest()
    assert len(server.calls) == 2 and c.wire == "json"


def test_response_parsed_by_its_content_type(server):
    """A server (or proxy) that answers JSON to a msgpack request is still understood."""
    server.script["/v1/models"] = [reply(200, {"model": MODEL}, JSON)]
    c = BiPromptClient(transport=httpx.MockTransport(server))
    assert c.models() == {"model": MODEL} and c.wire == "msgpack"
    assert c.health()["status"] == "ok"


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("BIPROMPT_API_KEY", "from-env")
    BiPromptClient(transport=httpx.MockTransport(server)).health()
    assert server.calls[-1].headers["authorization"] == "Bearer from-env"
    BiPromptClient(transport=httpx.MockTransport(server), api_key="").health()
    assert "authorization" not in server.calls[-1].headers


def test_client_side_validation_sends_nothing(client, server):
    with pytest.raises(ValueError, match="exactly one"):
        client.segment()
    with pytest.raises(ValueError, match="exactly one"):
        client.segment(IMG, image_id="0" * 64)
    with pytest.raises(ValueError):
        client.segment(IMG, mode="nonsense")
    with pytest.raises(ValueError):
        BiPromptClient(wire="xml")  # type: ignore[arg-type]
    assert server.calls == []


# --- images ---------------------------------------------------------------------------------


def test_image_inputs_give_the_same_bytes(tmp_path):
    data = load_image_bytes(IMG)
    assert data == load_image_bytes(IMG.copy())  # deterministic PNG: stable image ids
    assert data == load_image_bytes(np.asfortranarray(IMG))
    assert data == load_image_bytes(Image.fromarray(IMG))
    path = tmp_path / "img.png"
    path.write_bytes(data)
    assert load_image_bytes(path) == load_image_bytes(str(path)) == data
    assert load_image_bytes(bytearray(data)) == data
    assert image_size(data) == IMG.shape[:2]
    grey = IMG[..., 0]
    assert image_size(load_image_bytes(grey)) == grey.shape
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), IMG)


def test_image_inputs_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        load_image_bytes(IMG.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        load_image_bytes(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        load_image_bytes(np.zeros((4,), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_bytes(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="unsupported image type"):
        load_image_bytes(12)


def test_embed_info_and_segment_by_image_id(client, server):
    info = client.embed_info(IMG)
    assert info["cache"] == "miss" and (info["height"], info["width"]) == IMG.shape[:2]
    img_id = client.embed(IMG)
    seg = client.segment(image_id=img_id, points=[[4, 4]])
    assert seg.image_id == img_id and seg.cache_hit
    assert "image" not in server.calls[-1].body


# --- batches --------------------------------------------------------------------------------


def test_segment_batch_mixed_results(client, server):
    reqs = [{"image": IMG, "points": [[5, 5]]}, {"image": IMG, "text": "bad"},
            {"image": IMG, "bogus": 1}, {"image": IMG, "text": "a dog", "mode": "text"}]
    out = client.segment_batch(reqs)
    assert [r.ok for r in out] == [True, False, False, True]
    assert isinstance(out[1], BatchError) and isinstance(out[1].error, InvalidInputError)
    assert out[1].type == "invalid_prompt" and out[1].status_code == 422
    assert out[1].request_id == "req-1/1" and out[1].index == 1
    assert isinstance(out[2].error, ValueError) and "bogus" in out[2].message
    assert len(server.calls) == 1 and len(server.calls[0].body["items"]) == 3
    assert isinstance(out[3], Segmentation) and out[3].mode == "text"


def test_segment_many_partial_failure_keeps_order(client, server):
    imgs = make_images(3)
    reqs = [{"image": imgs[i % 3], "points": [[i, i]], "text": "bad" if i == 4 else f"t{i}"}
            for i in range(9)]
    out = client.segment_many(reqs, concurrency=4, progress=False)
    assert [r.ok for r in out] == [i != 4 for i in range(9)]
    assert isinstance(out[4].error, InvalidInputError) and out[4].type == "invalid_prompt"
    for i, r in enumerate(out):
        if r.ok:
            np.testing.assert_array_equal(r.mask, expected_mask(24, 32, [[i, i]]))
            assert r.image_id == hashlib.sha256(load_image_bytes(imgs[i % 3])).hexdigest()
    stats = client.last_batch_stats
    assert stats["items"] == 9 and stats["ok"] == 8 and stats["errors"] == 1


def test_segment_many_uploads_each_image_once(client, server, tmp_path):
    imgs = make_images(4)
    path = tmp_path / "third.png"
    path.write_bytes(load_image_bytes(imgs[2]))
    sources = [imgs[0], Image.fromarray(imgs[1]), path, load_image_bytes(imgs[3])]
    reqs = [{"image": sources[i % 4], "points": [[i, 2 * i]], "labels": [1]} for i in range(20)]
    out = client.segment_many(reqs, concurrency=8, progress=True)
    embeds, segs = server.paths("/v1/embed"), server.paths("/v1/segment")
    assert len(embeds) == 4 and len(segs) == 20
    assert {hashlib.sha256(c.body["image"]).hexdigest() for c in embeds} == set(server.images)
    assert all("image" not in c.body and len(c.body["image_id"]) == 64 for c in segs)
    assert all(r.ok and r.cache_hit for r in out)
    for i, r in enumerate(out):
        assert r.image_id == hashlib.sha256(load_image_bytes(imgs[i % 4])).hexdigest()
        np.testing.assert_array_equal(r.mask, expected_mask(24, 32, [[i, 2 * i]]))
    stats = client.last_batch_stats
    assert stats["embed_calls"] == 4 and stats["images"] == 4 and stats["cache_hits"] == 20
    assert stats["ok"] == 20 and stats["resends"] == 0 and stats["seconds"] >= 0


def test_segment_many_single_use_images_are_sent_inline(client, server):
    imgs = make_images(3)
    out = client.segment_many([{"image": im} for im in imgs], progress=False)
    assert all(r.ok for r in out) and server.paths("/v1/embed") == []
    assert all("image" in c.body for c in server.paths("/v1/segment"))


def test_segment_many_resends_the_image_after_a_404(client, server):
    imgs = make_images(2)
    evict_id = hashlib.sha256(load_image_bytes(imgs[0])).hexdigest()

    def evicting_embed(request: httpx.Request) -> httpx.Response:
        resp = server.route(request)  # embed for real, then forget it
        server.evicted.add(evict_id)
        return resp

    server.script["/v1/embed"] = [evicting_embed, evicting_embed]
    reqs = [{"image": imgs[i % 2], "points": [[i, i]]} for i in range(6)]
    out = client.segment_many(reqs, concurrency=1, progress=False)
    assert all(r.ok for r in out)
    segs = server.paths("/v1/segment")
    # the first item on the evicted image: 404 with image_id, then re-sent with the bytes
    # (which re-embeds it, so later items find it again)
    assert len(segs) == 7 and client.last_batch_stats["resends"] == 1
    with_image = [c for c in segs if "image" in c.body]
    assert len(with_image) == 1 and hashlib.sha256(with_image[0].body["image"]).hexdigest() \
        == evict_id


def test_segment_many_bad_items_and_unknown_image_ids(client, server):
    reqs = [{"image": IMG}, {"image": IMG.astype(np.float64)}, {"image_id": "f" * 64},
            {"points": [[1, 1]]}, {"image": IMG, "mode": "nope"}, {"image": IMG}]
    out = client.segment_many(reqs, progress=False)
    assert [r.ok for r in out] == [True, False, False, False, False, True]
    assert isinstance(out[1].error, ValueError) and "uint8" in out[1].message
    assert isinstance(out[2].error, NotFoundError)  # the caller's own image_id: no re-send
    assert "image" in out[3].message
    assert client.last_batch_stats["resends"] == 0


def test_segment_many_embed_failure_fails_its_items_only(client, server):
    imgs = make_images(2)
    server.script["/v1/embed"] = [err_reply(422, "invalid_image", "cannot decode")]
    reqs = [{"image": imgs[i % 2]} for i in range(4)]
    out = client.segment_many(reqs, concurrency=1, progress=False)
    # embeds run in order with concurrency=1: the first image's embed fails
    assert [r.ok for r in out] == [False, True, False, True]
    assert out[0].type == "invalid_image" and out[0].index == 0 and out[2].index == 2


# --- async ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["msgpack", "json"])
def test_async_segment_parity(server, wire):
    sync_seg = BiPromptClient(transport=httpx.MockTransport(FakeServer()), wire=wire).segment(
        IMG, points=[[7, 9]], mask_format="png", return_candidates=True)
    seg, _ = run(lambda c: c.segment(IMG, points=[[7, 9]], mask_format="png",
                                     return_candidates=True), server, wire=wire)
    np.testing.assert_array_equal(seg.mask, sync_seg.mask)
    assert seg.image_id == sync_seg.image_id and len(seg.candidates) == 3
    info, c = run(lambda c: c.models(), server, wire=wire)
    assert info["sam_variant"] == "tiny"


def test_async_retries_and_errors(server):
    sleeps: list[float] = []

    async def record(s: float) -> None:
        sleeps.append(s)

    server.script["/v1/segment"] = [
        err_reply(503, "overloaded", "busy", headers={"Retry-After": "2"}),
        err_reply(422, "invalid_prompt", "bad", rid="r9")]
    with pytest.raises(InvalidInputError) as ei:
        run(lambda c: c.segment(IMG), server, sleep=record)
    assert sleeps == [2.0] and ei.value.request_id == "r9" and len(server.calls) == 2


def test_async_segment_many_dedup_and_partial_failure(server):
    imgs = make_images(4)
    reqs = [{"image": imgs[i % 4], "points": [[i, i]], "text": "bad" if i == 5 else None}
            for i in range(20)]
    out, c = run(lambda c: c.segment_many(reqs, concurrency=3, progress=False), server)
    assert [r.ok for r in out] == [i != 5 for i in range(20)]
    assert out[5].type == "invalid_prompt"
    assert len(server.paths("/v1/embed")) == 4 and len(server.paths("/v1/segment")) == 20
    assert all("image" not in x.body for x in server.paths("/v1/segment"))
    for i, r in enumerate(out):
        if r.ok:
            assert r.image_id == hashlib.sha256(load_image_bytes(imgs[i % 4])).hexdigest()
    assert c.last_batch_stats["embed_calls"] == 4 and c.last_batch_stats["errors"] == 1


def test_async_segment_many_resend_and_batch(server):
    img_id = hashlib.sha256(load_image_bytes(IMG)).hexdigest()

    def evicting_embed(request: httpx.Request) -> httpx.Response:
        resp = server.route(request)
        server.evicted.add(img_id)
        return resp

    server.script["/v1/embed"] = [evicting_embed]
    out, c = run(lambda c: c.segment_many([{"image": IMG}] * 2, concurrency=1,
                                          progress=False), server)
    assert all(r.ok for r in out) and c.last_batch_stats["resends"] == 1
    out, _ = run(lambda c: c.segment_batch([{"image": IMG}, {"image": IMG, "text": "bad"}]),
                 server)
    assert [r.ok for r in out] == [True, False]


# --- packaging ------------------------------------------------------------------------------


def test_client_imports_no_torch_ray_or_server():
    code = (
        "import sys\n"
        "import biprompt_client.schema, biprompt_client.rle\n"
        "assert 'httpx' not in sys.modules, 'the schema alone must stay light'\n"
        "import biprompt_client, biprompt_client.client\n"
        "from biprompt_client import BiPromptClient, AsyncBiPromptClient, Segmentation\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'biprompt'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"

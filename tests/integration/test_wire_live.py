"""Issue 12 over HTTP, through Serve's proxy: deep bodies, request ids, 405s, per-item batch
errors, the limits in /v1/models, and no object reprs in messages."""

from __future__ import annotations

import base64
import json

import httpx
import msgpack
import pytest
from biprompt_client.schema import MAX_NESTING_DEPTH

from tests.integration.conftest import png_bytes, scene

pytestmark = pytest.mark.integration
IMG = base64.b64encode(png_bytes(scene(31))).decode()
JSON_HEADERS = {"Content-Type": "application/json"}


def our_error(r: httpx.Response) -> dict:
    body = (msgpack.unpackb(r.content) if "msgpack" in r.headers["content-type"] else r.json())
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "request_id"}
    assert body["error"]["message"].strip() and " at 0x" not in body["error"]["message"]
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


DEEP = {
    "100k brackets": b"[" * 100_000,
    "990-deep points": b'{"image": "' + IMG.encode() + b'", "points": ' + b"[" * 990
                       + b"]" * 990 + b"}",
    "deep batch item": b'{"items": [' + b"[" * 500 + b"]" * 500 + b"]}",
}


@pytest.mark.parametrize("path", ["/v1/segment", "/v1/embed", "/v1/segment/batch"])
@pytest.mark.parametrize("name", list(DEEP))
def test_deep_json_is_our_422(main_url, path, name):
    r = httpx.post(f"{main_url}{path}", content=DEEP[name], headers=JSON_HEADERS, timeout=60)
    assert r.status_code == 422, r.text
    err = our_error(r)
    assert err["type"] == "invalid_input" and f"at most {MAX_NESTING_DEPTH} levels" in err["message"]


@pytest.mark.parametrize("path", ["/v1/segment", "/v1/embed", "/v1/segment/batch"])
def test_deep_msgpack_is_our_422(main_url, path):
    r = httpx.post(f"{main_url}{path}", content=b"\x91" * 100_000 + b"\xc0",
                   headers={"Content-Type": "application/msgpack"}, timeout=60)
    assert r.status_code == 422
    assert f"at most {MAX_NESTING_DEPTH} levels" in our_error(r)["message"]


def test_undecodable_image_message_has_no_repr(main_url):
    body = {"image": base64.b64encode(b"definitely not an image").decode(), "points": [[1, 1]]}
    r = httpx.post(f"{main_url}/v1/segment", json=body, timeout=60)
    assert r.status_code == 422
    err = our_error(r)
    assert err["type"] == "invalid_image" and "BytesIO" not in err["message"], err


@pytest.mark.parametrize("rid", ["has spaces and/slashes", "x" * 300, pytest.param(
    "ünïcode-ish", marks=pytest.mark.xfail(strict=True, reason="Serve's proxy answers a "
                                           "non-UTF-8 header with a plain-text 500 before our "
                                           "app sees the request"))])
def test_an_odd_request_id_is_one_id_in_header_and_body(main_url, rid):
    r = httpx.post(f"{main_url}/v1/segment", json={"image_id": "c" * 64, "points": [[1, 1]]},
                   headers={"X-Request-ID": rid.encode("latin-1")}, timeout=60)
    assert r.status_code == 404, (r.headers, r.text)
    assert our_error(r)["request_id"] == r.headers["x-request-id"]
    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]


def test_405_has_allow(main_url):
    r = httpx.get(f"{main_url}/v1/segment", timeout=60)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    our_error(r)
    r = httpx.put(f"{main_url}/v1/models", timeout=60)
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_a_schema_invalid_batch_item_fails_alone(main_url):
    items = [{"image": IMG, "points": [[10, 10]]},
             {"image": IMG, "points": [[10, 10]], "colour": "red"},   # unknown field
             {"points": [[1, 1]]},                                    # neither image nor id
             7,                                                       # not an object
             {"image": IMG, "points": [[20, 30]], "mode": "point"}]
    r = httpx.post(f"{main_url}/v1/segment/batch", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["status"] for x in results] == [200, 422, 422, 422, 200]
    assert "colour" in results[1]["error"]["message"]
    assert "image_id" in results[2]["error"]["message"]
    assert results[3]["error"]["request_id"] == f"{body['request_id']}/3"
    assert results[0]["result"]["mask"] and results[4]["result"]["mask"]


def test_a_batch_envelope_that_is_wrong_is_422(main_url):
    for body in ({"items": []}, {"items": "x"}, {"itemz": [{}]}, [1, 2]):
        r = httpx.post(f"{main_url}/v1/segment/batch", json=body, timeout=60)
        assert r.status_code == 422, (body, r.text)
        our_error(r)


def test_models_lists_every_limit(main_url):
    limits = httpx.get(f"{main_url}/v1/models", timeout=60).json()["limits"]
    assert {"max_body_bytes", "max_image_pixels", "max_batch_items", "max_points",
            "max_wire_text_chars", "max_text_chars", "max_text_tokens",
            "max_nesting_depth"} <= set(limits)
    assert limits["max_wire_text_chars"] == 2048 and limits["max_text_chars"] <= 2048
    assert limits["max_nesting_depth"] == MAX_NESTING_DEPTH


def test_openapi_is_served_and_references_resolve(main_url):
    doc = httpx.get(f"{main_url}/openapi.json", timeout=60).json()
    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    assert "SegmentRequest" in schemas and "SegmentRequestMsgpack" in schemas
    for part in text.split('"$ref": "#/components/schemas/')[1:]:
        assert part.split('"', 1)[0] in schemas

"""Every error is our JSON body, bodies have a nesting limit, and the OpenAPI document describes
what the wire accepts (issue 12): checked without Ray, on the FastAPI app and the shared schema."""

from __future__ import annotations

import json

import msgpack
import pytest
from biprompt_client.schema import (
    JSON,
    MAX_NESTING_DEPTH,
    MSGPACK,
    BatchRequest,
    EmbedRequest,
    SegmentRequest,
    WireError,
    decode_body,
)
from fastapi import Request
from fastapi.testclient import TestClient

import deployments.ingress  # noqa: F401 - registers the v1 routes on `api`
from biprompt.errors import InvalidImageError
from deployments.http import api, clean_message

# --- nesting limits -------------------------------------------------------------------------


def nested(depth: int) -> list:
    obj: list = []
    for _ in range(depth - 1):
        obj = [obj]
    return obj


@pytest.mark.parametrize("body", [
    b"[" * 100_000,                                                       # the case
    b'{"image_id": "' + b"a" * 64 + b'", "points": ' + b"[" * 990 + b"]" * 990 + b"}",
    json.dumps(nested(MAX_NESTING_DEPTH + 1)).encode(),
], ids=["100k brackets", "990-deep points", "one past the limit"])
def test_deep_json_is_a_wire_error_naming_the_limit(body):
    with pytest.raises(WireError, match=f"at most {MAX_NESTING_DEPTH} levels"):
        decode_body(body)


@pytest.mark.parametrize("body", [
    b"\x91" * 100_000 + b"\xc0",                                    # past msgpack's own stack
    msgpack.packb({"items": [{"points": nested(MAX_NESTING_DEPTH)}]}),
], ids=["100k arrays", "past our limit"])
def test_deep_msgpack_is_a_wire_error_naming_the_limit(body):
    with pytest.raises(WireError, match=f"at most {MAX_NESTING_DEPTH} levels"):
        decode_body(body, MSGPACK)


def test_the_limit_itself_and_real_bodies_pass():
    assert decode_body(json.dumps(nested(MAX_NESTING_DEPTH)).encode()) == nested(MAX_NESTING_DEPTH)
    batch = {"items": [{"image_id": "a" * 64, "points": [[1, 2]], "box": [0, 0, 3, 3]}] * 3}
    assert BatchRequest.model_validate(decode_body(json.dumps(batch).encode()))
    assert BatchRequest.model_validate(decode_body(msgpack.packb(batch), MSGPACK))


# --- messages -------------------------------------------------------------------------------


def test_messages_carry_no_object_reprs_and_are_never_empty():
    # PIL's UnidentifiedImageError: "cannot identify image file <_io.BytesIO object at 0x...>"
    pil = "could not decode the image bytes: cannot identify image file " \
          "<_io.BytesIO object at 0x7f3a2c1b9e40>"
    assert clean_message(pil, 422) == "could not decode the image bytes: cannot identify " \
                                      "image file"
    assert "0x" not in clean_message("bad <function f at 0xdeadbeef> here", 422)
    assert clean_message("", 422) == "invalid request"
    assert clean_message(None, 500)
    assert clean_message("  ", 405) == "method not allowed"


def test_an_undecodable_image_message_has_no_repr():
    from biprompt.images import decode_image_bytes

    with pytest.raises(InvalidImageError) as info:
        decode_image_bytes(b"not an image")
    assert " at 0x" not in clean_message(info.value.message, 422)


# --- the HTTP surface, on the FastAPI app itself ----------------------------------------------


@pytest.fixture(scope="module")
def client():
    """`api` with two extra routes: one raising something unexpected, one decoding its body."""

    async def boom(request: Request):
        raise RuntimeError("")  # unexpected, and with an empty message

    async def echo(request: Request):
        return {"ok": type(decode_body(await request.body())).__name__}

    paths = ["/__test/boom", "/__test/echo"]
    api.add_api_route(paths[0], boom, methods=["POST"])
    api.add_api_route(paths[1], echo, methods=["POST"])
    try:
        # raise_server_exceptions: nothing may escape the app, every failure is a response
        with TestClient(api, raise_server_exceptions=True) as c:
            yield c
    finally:
        api.router.routes[:] = [r for r in api.router.routes if getattr(r, "path", "") not in paths]


def error_of(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "request_id"}
    assert body["error"]["message"].strip()
    return body["error"]


def test_unexpected_exception_is_a_500_with_our_body_and_the_request_id(client, caplog):
    r = client.post("/__test/boom", content=b"{}", headers={"X-Request-ID": "job-1"})
    assert r.status_code == 500
    err = error_of(r)
    assert err["request_id"] == "job-1" and err["type"] == "internal_error"
    assert "RuntimeError" in err["message"]
    assert any("job-1" in rec.getMessage() for rec in caplog.records)


def test_deep_body_through_the_app_is_not_a_recursion_error(client):
    # the route lets the WireError escape: the app still answers with our body (a 422 once a
    # route maps it, as the v1 routes do; here the handler of last resort maps it)
    r = client.post("/__test/echo", content=b"[" * 100_000)
    err = error_of(r)
    assert r.status_code == 422 and f"at most {MAX_NESTING_DEPTH} levels" in err["message"]


def test_an_odd_request_id_is_the_one_in_the_body(client):
    # Serve's proxy echoes the caller's X-Request-ID as sent; the body carries the same value
    r = client.post("/__test/boom", content=b"{}", headers={"X-Request-ID": "not valid/ id!"})
    assert error_of(r)["request_id"] == "not valid/ id!"
    r = client.post("/__test/boom", content=b"{}")
    assert len(error_of(r)["request_id"]) == 32


def test_405_has_allow_and_our_body(client):
    r = client.get("/v1/segment")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert error_of(r)["type"] == "http_error"
    r = client.delete("/v1/models")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_unknown_route_is_our_404(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["message"]


# --- the OpenAPI document -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> dict:
    return api.openapi()


def refs(obj):
    if isinstance(obj, dict):
        if "$ref" in obj:
            yield obj["$ref"]
        for v in obj.values():
            yield from refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from refs(v)


def test_every_reference_resolves(doc):
    schemas = doc["components"]["schemas"]
    found = set(refs(doc))
    assert "#/components/schemas/SegmentRequest" in found
    for ref in found:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref


def body_schema(doc, path: str, media: str) -> dict:
    ref = doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]["$ref"]
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_image_is_base64_in_json_and_binary_in_msgpack(doc):
    for path in ("/v1/segment", "/v1/embed"):
        js, mp = body_schema(doc, path, "application/json"), body_schema(doc, path, MSGPACK)
        (as_json,) = [s for s in js["properties"]["image"].get("anyOf", [js["properties"]["image"]])
                      if s.get("type") == "string"]
        assert as_json["contentEncoding"] == "base64" and "format" not in as_json
        (as_msgpack,) = [s for s in mp["properties"]["image"].get("anyOf",
                                                                   [mp["properties"]["image"]])
                         if s.get("type") == "string"]
        assert as_msgpack["format"] == "binary"


def test_exactly_one_of_image_and_image_id_is_in_the_schema(doc):
    import jsonschema

    schema = body_schema(doc, "/v1/segment", "application/json")
    v = jsonschema.Draft202012Validator(schema)
    img, iid = "iVBORw0KGgo=", "a" * 64
    for body in ({"image": img}, {"image_id": iid}, {"image": img, "image_id": None},
                 {"image": None, "image_id": iid}):
        assert v.is_valid(body), body
        SegmentRequest.model_validate(decode_body(json.dumps(body).encode()))
    for body in ({}, {"image": img, "image_id": iid}, {"image": None}, {"image_id": None}):
        assert not v.is_valid(body), body
        with pytest.raises(ValueError):
            SegmentRequest.model_validate(decode_body(json.dumps(body).encode()))


def _unwrap_binary(value):
    """schemathesis wraps drawn `format: binary` values; msgpack packs the raw bytes."""
    data = getattr(value, "data", None)
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(value, dict):
        return {k: _unwrap_binary(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap_binary(v) for v in value]
    return value


@pytest.mark.parametrize("path,model", [("/v1/segment", SegmentRequest),
                                        ("/v1/segment/batch", BatchRequest),
                                        ("/v1/embed", EmbedRequest)])
def test_bodies_valid_by_the_schema_pass_the_wire_validation(doc, path, model):
    """What schemathesis draws as valid for an operation (JSON or msgpack), the wire accepts: the
    schema is no stricter and no looser than the models (image content is checked on decode).
    NOTE: once a msgpack serializer is registered with schemathesis (the integration tier does),
    it draws msgpack bodies too, whatever media type is asked for: both are checked."""
    import schemathesis
    from hypothesis import HealthCheck, assume, given, settings
    from schemathesis import GenerationMode

    op = schemathesis.openapi.from_dict(doc)[path]["POST"]

    # derandomize: the same 60 examples every run, on every machine
    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def check(case):
        if case.media_type == MSGPACK:
            try:
                wire = msgpack.packb(_unwrap_binary(case.body), use_bin_type=True)
            except OverflowError:  # an integer past 64 bits: no msgpack body can carry it
                assume(False)
        else:
            assert case.media_type == JSON
            wire = json.dumps(case.body).encode()
        model.model_validate(decode_body(wire, case.media_type))

    check()

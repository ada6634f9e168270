"""schemathesis against the live `main` app, from the app's own /openapi.json (issue 12), bounded:
POSITIVE_EXAMPLES valid-by-schema and NEGATIVE_EXAMPLES invalid cases per operation, JSON and
msgpack bodies, a real PNG mixed into the drawn images so that the model path runs too.

Asserted: no 5xx; every response conforms to the document (status, content type, headers, body
schema); no request that is valid by the schema is refused by the wire's validation. What the
schema cannot express is allowed as a refusal and counted: the image bytes not decoding
(`invalid_image`), the prompt not fitting the image or the text model (`invalid_prompt`, e.g. a
drawn point outside the image), an `image_id` never embedded (404) and pixels over the limit (413).
A schema-invalid case must be refused (4xx); in a batch, the invalid item's own 422 counts.
"""

from __future__ import annotations

import base64
import collections
import time

import msgpack
import pytest
from biprompt_client.schema import _jsonable

from tests.integration.conftest import png_bytes, scene

pytestmark = pytest.mark.integration
schemathesis = pytest.importorskip("schemathesis")

POSITIVE_EXAMPLES = 50
NEGATIVE_EXAMPLES = 25
SEED = 20261201
BUDGET_S = 150  # all operations together; the bound, not the expected time
CONTENT_REFUSALS = {(422, "invalid_image"), (422, "invalid_prompt"), (404, "not_found"),
                    (413, "payload_too_large")}
PNG = png_bytes(scene(7, 96, 128))


def _raw(value):
    """schemathesis's generated values -> what msgpack packs (its Binary wraps raw bytes)."""
    data = getattr(value, "data", None)
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(value, dict):
        return {k: _raw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_raw(v) for v in value]
    return value


@schemathesis.serializer("application/msgpack")
def _to_msgpack(ctx, value):
    return msgpack.packb(_raw(value), use_bin_type=True)


@schemathesis.deserializer("application/msgpack")
def _from_msgpack(ctx, response):
    # raw bytes in msgpack; the document's `format: binary` strings: validated as base64 text
    return _jsonable(msgpack.unpackb(response.content, raw=False))


def _with_real_image(body, media: str, use: bool):
    """Put a real PNG where a drawn image stands (still valid by the schema)."""
    if not use or not isinstance(body, dict):
        return body
    png = PNG if media == "application/msgpack" else base64.b64encode(PNG).decode()
    if body.get("image") is not None:
        # drawn points folded into the PNG's 128x96 (still valid by the schema): prompts that
        # fit, so that the models answer some of these
        points = [[abs(x) % 128, abs(y) % 96] for x, y in body.get("points") or []]
        return {**body, "image": png, **({"points": points} if points else {})}
    if isinstance(body.get("items"), list):
        return {**body, "items": [_with_real_image(it, media, True) for it in body["items"]]}
    return body


def _error_types(response) -> list[tuple[int, str]]:
    """(status, error type) of the reply, or of each failed batch item."""
    try:
        body = (msgpack.unpackb(response.content) if "msgpack" in
                response.headers.get("content-type", "") else response.json())
    except ValueError:
        return [(response.status_code, "<not our body>")]
    if response.status_code == 200 and isinstance(body, dict) and "results" in body:
        return [(r["status"], r["error"]["type"]) for r in body["results"] if r.get("error")]
    if response.status_code >= 400:
        return [(response.status_code, (body.get("error") or {}).get("type", "<not our body>"))]
    return []


def test_schemathesis_against_the_live_app(main_url):
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{main_url}/openapi.json", timeout=60)
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    t0 = time.monotonic()

    def run(operation, mode, n: int):
        # Negative cases in JSON only: schemathesis 4.32's negative mode checks its mutated
        # msgpack bodies against the schema with a validator that can't read its own Binary
        # wrapper ("ValueError: Unsupported type: 'Binary'", raised while *generating*, for some
        # seeds). Positive cases cover both media types.
        media = {"media_type": "application/json"} if mode == GenerationMode.NEGATIVE else {}
        # A fixed seed: derandomize alone derives one from the strategy's repr, which names the
        # app's free port, so each run drew other cases (one of them hit the bug above).
        @seed(SEED)
        @settings(max_examples=n, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, **media), real=st.booleans())
        def one(case, real):
            if time.monotonic() - t0 > BUDGET_S:
                counts["skipped: over the time budget"] += 1
                return
            if mode == GenerationMode.POSITIVE:
                case.body = _with_real_image(case.body, case.media_type or "", real)
            label = f"{case.method} {case.path} {mode.value}"
            if case.media_type == "application/msgpack":
                try:
                    msgpack.packb(_raw(case.body), use_bin_type=True)
                except (OverflowError, ValueError):  # e.g. an integer past 64 bits
                    counts["skipped: not representable in msgpack"] += 1
                    return
            counts[label] += 1
            response = case.call(base_url=main_url, timeout=60)
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                failures.append(f"{label} -> {response.status_code}: {exc}"[:2000])
                return
            seen = _error_types(response)
            for status, etype in seen:
                counts[f"{label} refused {status} {etype}"] += 1
            if response.status_code == 200:
                counts[f"{label} answered 200"] += 1
            if mode == GenerationMode.POSITIVE:
                rejected = [s for s in seen if s not in CONTENT_REFUSALS]
                if rejected:
                    failures.append(f"{label}: valid by the schema, refused {rejected}: "
                                    f"{response.content[:300]!r} for {str(case.body)[:300]}")
            elif response.status_code < 400 and not seen:
                failures.append(f"{label}: invalid by the schema, accepted "
                                f"{response.status_code} for {str(case.body)[:300]}")

        one()

    for operation in schema.get_all_operations():
        op = operation.ok()
        run(op, GenerationMode.POSITIVE, POSITIVE_EXAMPLES)
        if op.method.upper() == "POST":
            run(op, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
    print(f"schemathesis: {time.monotonic() - t0:.0f} s")
    for key, value in sorted(counts.items()):
        print(f"  {value:4d}  {key}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    assert sum(v for k, v in counts.items() if " refused " not in k and "skipped" not in k) > 100

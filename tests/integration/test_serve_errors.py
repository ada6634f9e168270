"""Bad input, auth and overload over HTTP: the right status, an actionable message, and always
the body {"error": {"type", "message", "request_id"}}."""

from __future__ import annotations

import base64
import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import numpy as np
import pytest

from tests.integration.conftest import API_KEY, png_bytes, scene

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
IMG = base64.b64encode(png_bytes(scene(30))).decode()


def call(url: str, body, headers=AUTH, path="/v1/segment") -> tuple[int, dict, httpx.Response]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)
    err = r.json()
    assert set(err) == {"error"}, err
    assert set(err["error"]) == {"type", "message", "request_id"}
    assert err["error"]["request_id"] == r.headers["x-request-id"]
    return r.status_code, err["error"], r


CASES = [
    ("undecodable image", {"image": base64.b64encode(b"not an image").decode(),
                           "points": [[1, 1]]}, 422, "invalid_image", "decode"),
    ("not base64", {"image": "%%%", "points": [[1, 1]]}, 422, "invalid_input", "base64"),
    ("unknown field", {"image": IMG, "points": [[1, 1]], "colour": "red"}, 422,
     "invalid_input", "colour"),
    ("no image", {"points": [[1, 1]]}, 422, "invalid_input", "image_id"),
    ("point outside", {"image": IMG, "points": [[320, 10]]}, 422, "invalid_prompt", "outside"),
    ("negative point", {"image": IMG, "points": [[-1, 10]]}, 422, "invalid_prompt", "outside"),
    ("wrong arity", {"image": IMG, "points": [[1, 2, 3]]}, 422, "invalid_input", "points"),
    ("labels count", {"image": IMG, "points": [[1, 2]], "point_labels": [1, 0]}, 422,
     "invalid_prompt", "labels"),
    ("bad mode", {"image": IMG, "points": [[1, 2]], "mode": "magic"}, 422, "invalid_input",
     "mode"),
    ("text mode without text", {"image": IMG, "mode": "text"}, 422, "invalid_prompt", "text"),
    ("no points", {"image": IMG, "text": "the circle"}, 422, "invalid_prompt", "point"),
    ("over-long text", {"image": IMG, "points": [[1, 1]], "text": "the red circle " * 60}, 422,
     "invalid_prompt", "limit"),
    ("unknown image_id", {"image_id": "a" * 64, "points": [[1, 1]]}, 404, "not_found",
     "image_id"),
    ("malformed image_id", {"image_id": "xyz", "points": [[1, 1]]}, 422, "invalid_input",
     "image_id"),
]


@pytest.mark.parametrize("name,body,status,etype,word", CASES, ids=[c[0] for c in CASES])
def test_bad_input(strict_url, name, body, status, etype, word):
    got, err, _ = call(strict_url, body)
    assert (got, err["type"]) == (status, etype), err
    assert word in err["message"], err["message"]


def test_nan_and_infinite_points(strict_url):
    for bad in ("NaN", "Infinity"):
        raw = b'{"image": "' + IMG.encode() + b'", "points": [[' + bad.encode() + b", 1]]}"
        got, err, _ = call(strict_url, raw)
        assert (got, err["type"]) == (422, "invalid_prompt") and "NaN or infinite" in err["message"]


def test_invalid_json_and_empty_body(strict_url):
    got, err, _ = call(strict_url, b"{not json")
    assert got == 422 and "JSON" in err["message"]
    got, err, _ = call(strict_url, b"")
    assert got == 422 and "empty" in err["message"]


def test_body_over_the_limit_is_413(strict_url):
    big = {"image": base64.b64encode(b"x" * (2 * 2**20)).decode(), "points": [[1, 1]]}
    got, err, _ = call(strict_url, big)
    assert (got, err["type"]) == (413, "payload_too_large") and "limit" in err["message"]


def test_pixel_count_over_the_limit_is_413(strict_url):
    flat = np.zeros((500, 500, 3), dtype=np.uint8)  # 250k pixels > 200k, a tiny PNG
    got, err, _ = call(strict_url, {"image": base64.b64encode(png_bytes(flat)).decode(),
                                    "points": [[1, 1]]})
    assert (got, err["type"]) == (413, "payload_too_large") and "Downscale" in err["message"]


def test_api_key_required_except_health(strict_url):
    body = {"image": IMG, "points": [[1, 1]]}
    got, err, r = call(strict_url, body, headers={"Content-Type": "application/json"})
    assert (got, err["type"]) == (401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
    got, _, _ = call(strict_url, body, headers={**AUTH, "Authorization": "Bearer wrong"})
    assert got == 401
    assert httpx.get(f"{strict_url}/v1/models").status_code == 401
    assert httpx.get(f"{strict_url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{strict_url}/healthz").status_code == 200
    ok = httpx.post(f"{strict_url}/v1/segment", json=body, headers=AUTH, timeout=60)
    assert ok.status_code == 200


def test_request_id_is_echoed(strict_url):
    r = httpx.post(f"{strict_url}/v1/segment", json={"image_id": "b" * 64, "points": [[1, 1]]},
                   headers={**AUTH, "X-Request-ID": "job-42.item-7"}, timeout=60)
    assert r.status_code == 404
    assert r.json()["error"]["request_id"] == "job-42.item-7" == r.headers["x-request-id"]


def test_full_queue_is_503_with_retry_after(strict_url, encoder_gate):
    """The strict app's encoder runs one request and queues one. With its gate closed, a first
    new image holds the encoder; of two more, one waits in the queue and the other is refused at
    once: 503 + Retry-After and our error body. The gate opened, the other two succeed."""
    bodies = [{"image": base64.b64encode(png_bytes(scene(100 + i))).decode(),
               "points": [[5, 5]], "text": "the circle"} for i in range(3)]

    def send(body):
        return httpx.post(f"{strict_url}/v1/segment", json=body, headers=AUTH, timeout=120)

    # the ingress reads the encoder's model info once: done here, so that while the gate is
    # closed nothing but these requests waits for the encoder
    assert httpx.get(f"{strict_url}/v1/models", headers=AUTH, timeout=60).status_code == 200
    with ThreadPoolExecutor(3) as pool:
        with encoder_gate.closed():
            first = pool.submit(send, bodies[0])
            encoder_gate.wait_until_held()
            rest = [pool.submit(send, b) for b in bodies[1:]]
            done, _ = wait(rest, timeout=60, return_when=FIRST_COMPLETED)
            assert done, "neither request was refused while the encoder was held"
            assert len(done) == 1, "both were refused: the queue holds none"
            (refused,) = done
        assert first.result().status_code == 200, first.result().text
        queued = next(f for f in rest if f is not refused).result()
        assert queued.status_code == 200, queued.text
    r = refused.result()
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "overloaded" and err["request_id"] == r.headers["x-request-id"]

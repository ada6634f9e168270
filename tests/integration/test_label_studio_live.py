"""Label Studio's ML backend protocol on the live `main` app: an image served over a local
http.server, a /label-studio/predict body shaped as Label Studio sends it, and the brush RLE
read back with label-studio-sdk's decoder equal to /v1/segment's mask for the same prompt."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from biprompt_client import rle

from tests.integration.conftest import png_bytes, scene
from tests.support.redis_server import free_port

pytestmark = pytest.mark.integration
H, W = 240, 320
PNG = png_bytes(scene(41, H, W))
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


@pytest.fixture(scope="module")
def image_url():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path != "/photo.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def predict_body(image: str, x_pct: float, y_pct: float, text: str) -> dict:
    regions = [
        {"original_width": W, "original_height": H, "image_rotation": 0,
         "value": {"x": x_pct, "y": y_pct, "width": 0.5, "keypointlabels": ["Object"]},
         "is_positive": True, "id": "k1", "from_name": "tag2", "to_name": "image",
         "type": "keypointlabels", "origin": "manual"},
        {"value": {"text": [text]}, "id": "t1", "from_name": "prompt", "to_name": "image",
         "type": "textarea", "origin": "manual"},
    ]
    return {"tasks": [{"id": 1, "data": {"image": image}}], "model_version": "INITIAL",
            "project": "1.1764496800", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def test_predict_answers_our_mask_as_label_studio_brush_rle(main_url, image_url):
    from label_studio_sdk.converter.brush import decode_rle

    # both calls on a warm embedding: the same model path, the same bits
    assert httpx.post(f"{main_url}/v1/embed", json={"image": base64.b64encode(PNG).decode()},
                      timeout=120).status_code == 200
    x_pct, y_pct, text = 40.0, 37.5, "the bright square"
    r = httpx.post(f"{main_url}/label-studio/predict",
                   json=predict_body(f"{image_url}/photo.png", x_pct, y_pct, text), timeout=120)
    assert r.status_code == 200, r.text
    (pred,) = r.json()["results"]
    ours = httpx.post(f"{main_url}/v1/segment", json={
        "image": base64.b64encode(PNG).decode(), "points": [[x_pct / 100 * W, y_pct / 100 * H]],
        "text": text, "mode": "biprompt"}, timeout=120)
    assert ours.status_code == 200, ours.text
    expected = rle.decode(ours.json()["mask"])
    assert pred["model_version"].startswith("BiPrompt-SAM:" + ours.json()["model"]["sam"])
    if not expected.any():  # an empty mask is a prediction without regions
        assert pred["result"] == []
        pytest.fail("the tiny model's mask is empty here: pick another click")
    (region,) = pred["result"]
    assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "tag",
                                                                        "image")
    assert (region["original_width"], region["original_height"]) == (W, H)
    assert region["value"]["brushlabels"] == ["Object"] and region["value"]["format"] == "rle"
    rgba = decode_rle(region["value"]["rle"]).reshape(H, W, 4)
    assert np.array_equal(rgba[..., 3] > 0, expected)


def test_health_setup_webhook_and_an_unreachable_image(main_url):
    for path in ("/label-studio/health", "/label-studio/"):
        r = httpx.get(f"{main_url}{path}", timeout=60)
        assert r.status_code == 200 and r.json() == {"status": "UP", "model_class": "BiPromptSAM"}
    r = httpx.post(f"{main_url}/label-studio/setup",
                   json={"project": "1.1764496800", "schema": LABEL_CONFIG}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"].startswith("BiPrompt-SAM:")
    r = httpx.post(f"{main_url}/label-studio/webhook",
                   json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=60)
    assert r.status_code == 200 and r.json()["result"]["trained"] is False
    dead = f"http://127.0.0.1:{free_port()}/photo.png"
    r = httpx.post(f"{main_url}/label-studio/predict", json=predict_body(dead, 50, 50, "x"),
                   timeout=120)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and dead in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert "/label-studio/predict" not in httpx.get(f"{main_url}/openapi.json", timeout=60).text

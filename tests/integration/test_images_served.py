"""Images over HTTP: rotated phone JPEGs are segmented as displayed, images too thin for SAM get
a 422 without failing the images batched with them, the pixel limit is read from the header,
and decoding a large image leaves the Ingress's event loop free (/healthz stays fast)."""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from biprompt_client import rle
from biprompt_client.cli import main as cli
from PIL import Image

from biprompt.cache import image_id
from biprompt.config import DEFAULT_MAX_PIXELS
from biprompt.images import decode_image_bytes
from tests.integration.conftest import _run, assert_close_rle, png_bytes, scene
from tests.support.exif_images import encode, rotated_jpeg, stored

pytestmark = pytest.mark.integration
DEMO = "configs/models/demo.yaml"


def post(url: str, image: bytes, **body) -> httpx.Response:
    data = {"image": base64.b64encode(image).decode(), **body}
    return httpx.post(f"{url}/v1/segment", content=json.dumps(data), timeout=120,
                      headers={"Content-Type": "application/json"})


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def demo_url(serve_url):
    """The trained demo model, served (in-process cache): its masks mean something, so a click
    on the wrong object shows. Deleted after this module, so it holds no memory beyond it."""
    from ray import serve

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    names = ("ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask", "Selector", "Ingress")
    _run("images", {"model_profile": DEMO, "cache_url": None,
                    "deployment_options": {n: small for n in names}})
    yield f"{serve_url}/images"
    serve.delete("images")


@pytest.fixture(scope="module")
def demo_samples():
    """Landscape ShapesRef samples whose target the demo model gets right on the plain array."""
    from biprompt.data.shapes_ref import make_samples
    from biprompt.pipeline import BiPromptPipeline

    pipe = BiPromptPipeline.from_config(DEMO)
    good = [s for s in make_samples(12, seed=707, height=192, width=256)
            if iou(pipe.segment(s.image, [s.point], text=s.expression).mask, s.gt_mask) > 0.7]
    assert len(good) >= 3
    return good[:3]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_rotated_jpeg_is_segmented_as_displayed(demo_url, demo_samples, orientation):
    for s in demo_samples:
        data = encode(stored(s.image, orientation), orientation)
        r = post(demo_url, data, points=[list(s.point)], text=s.expression)
        assert r.status_code == 200, r.text
        res = r.json()
        h, w = s.gt_mask.shape
        assert (res["height"], res["width"]) == (h, w)
        assert res["mask"]["size"] == [h, w]
        assert res["image_id"] == image_id(data)  # the bytes sent, not a re-encoding
        mask = rle.decode(res["mask"])
        col, row = s.point_index
        assert mask[row, col], "the mask misses the click"
        assert iou(mask, s.gt_mask) > 0.5


def test_rotated_jpeg_equals_its_displayed_pixels(main_url):
    """Same pixels, same answer: the JPEG with orientation 6 and a PNG of what it displays."""
    data = rotated_jpeg(6)
    as_png = png_bytes(decode_image_bytes(data)[0])
    a = post(main_url, data, points=[[300, 20]], text="the thing", return_candidates=True)
    b = post(main_url, as_png, points=[[300, 20]], text="the thing", return_candidates=True)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    a, b = a.json(), b.json()
    assert (a["height"], a["width"]) == (b["height"], b["width"]) == (240, 320)
    assert_close_rle(a["mask"], b["mask"])
    for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
        assert_close_rle(ca["mask"], cb["mask"])


def test_cli_overlay_of_a_rotated_jpeg(main_url, tmp_path, capsys):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(rotated_jpeg(8))
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = cli(["--url", main_url, "segment", str(path), "--point", "300,20", "--mode",
                "point", "--out", str(out), "--overlay", str(overlay), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mask"]["size"] == [240, 320]
    with Image.open(overlay) as ov:
        assert ov.size == (320, 240)


# --- thin images: 422 before batching -------------------------------------------------------------


def test_thin_images_get_422_and_leave_the_rest_of_the_wave_alone(main_url):
    """The issue's round: new valid images sent together with a thin one. Before: the thin one
    failed the encoder batch (500 for it and for its batch mates)."""
    thins = [np.full((3, 4000, 3), 200, np.uint8), np.full((2, 60000, 3), 200, np.uint8),
             np.full((60000, 2, 3), 200, np.uint8)]
    for rnd, thin in enumerate(thins):
        valid = [png_bytes(scene(9000 + 10 * rnd + i)) for i in range(4)]
        bodies = [png_bytes(thin)] + valid
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: post(main_url, b, points=[[1, 1]], mode="point"),
                                    bodies))
        thin_reply, *rest = replies
        assert thin_reply.status_code == 422, thin_reply.text
        err = thin_reply.json()["error"]
        assert err["type"] == "invalid_image"
        assert "aspect ratio" in err["message"] and ":1" in err["message"]
        assert [r.status_code for r in rest] == [200] * len(rest), [r.text for r in rest]


# --- cost budget ----------------------------------------------------------------------------------


def flat_png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_issues_8192x8192_png_is_refused_from_its_header(main_url):
    """A 215 KB PNG of 64 Mi pixels cost 11-13 s of CPU; over the default limit now, it is
    refused from the header (413) without decoding."""
    data = flat_png(8192, 8192)
    assert len(data) < 1 << 20
    t = time.perf_counter()
    r = post(main_url, data, points=[[1, 1]], mode="point")
    elapsed = time.perf_counter() - t
    assert r.status_code == 413, r.text
    assert str(DEFAULT_MAX_PIXELS) in r.json()["error"]["message"]
    assert elapsed < 1.0, f"{elapsed:.2f} s: was it decoded?"


def test_healthz_stays_fast_while_a_large_image_decodes(main_url):
    """Decoding runs in a thread: the event loop answers /healthz meanwhile (it stalled 2 s).

    The decode ends at least `image_decode` ms after the request was sent, so every poll that
    starts within that many ms of sending runs before or during the decode: those are judged.
    """
    side = int(DEFAULT_MAX_PIXELS**0.5)  # just inside the limit: about 0.5-1 s of decoding
    body = json.dumps({"image": base64.b64encode(flat_png(side, side)).decode(),
                       "points": [[1, 1]], "mode": "point"})
    done = threading.Event()
    result: dict = {}

    def send():
        try:
            result["reply"] = httpx.post(f"{main_url}/v1/segment", content=body, timeout=120,
                                         headers={"Content-Type": "application/json"})
        finally:
            done.set()

    polls: list[tuple[float, float]] = []  # (started, seconds after sending; took, seconds)
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{main_url}/healthz").status_code == 200  # connection warm
        worker = threading.Thread(target=send, daemon=True)
        t0 = time.perf_counter()
        worker.start()
        deadline = time.monotonic() + 120  # bounded: a hang fails, it doesn't stall the suite
        while not done.is_set() and time.monotonic() < deadline:
            t = time.perf_counter()
            assert client.get(f"{main_url}/healthz").status_code == 200
            polls.append((t - t0, time.perf_counter() - t))
            time.sleep(0.01)
        worker.join(timeout=5)
    reply = result["reply"]
    assert reply.status_code == 200, reply.text
    decode_s = reply.json()["timings_ms"]["image_decode"] / 1000.0
    assert decode_s > 0.3, f"decode took {decode_s:.3f} s: too short to test anything"
    during = [took for started, took in polls if started < decode_s]
    print(f"decode {decode_s:.3f} s; {len(during)} healthz polls during it, slowest "
          f"{max(during) * 1000:.0f} ms; {len(polls)} in all, slowest "
          f"{max(took for _, took in polls) * 1000:.0f} ms")
    assert len(during) >= 3, polls
    # Decoding on the event loop would hold a poll that starts during it for most of the decode
    # (the issue saw 2 s). Judged without wall-clock luck: the typical poll is under 100 ms, and
    # no poll waits a third of the decode (on an idle machine the slowest was 57-73 ms; a loaded
    # CI machine must not turn that into a flaky failure).
    assert statistics.median(during) < 0.1, f"/healthz median {statistics.median(during):.3f} s"
    assert max(during) < max(0.1, decode_s / 3), (
        f"/healthz took {max(during) * 1000:.0f} ms during a {decode_s:.2f} s decode")

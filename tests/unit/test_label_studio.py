"""The Label Studio ML backend adapter (deployments/label_studio.py) without Ray: bodies shaped as
Label Studio sends them, a fake segment path, images over httpx.MockTransport (or a closed
port), and the brush RLE read back with label-studio-sdk's own decoder."""

from __future__ import annotations

import asyncio
import base64
import copy
import io

import httpx
import numpy as np
import pytest
from biprompt_client import rle
from fastapi import Request
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from biprompt.errors import InvalidImageError, InvalidInputError, PayloadTooLargeError
from deployments.http import api
from deployments.label_studio import (
    BasicAuthError,
    ImageFetcher,
    LabelStudioBackend,
    UpstreamError,
    parse_label_config,
)
from tests.support.redis_server import free_port
from tests.support.scenes import png_bytes, scene

H, W = 96, 128
PNG = png_bytes(scene(5, H, W))
LS_URL = "http://label-studio.internal:8080"
LS_TOKEN = "0123abcd-legacy-token"

LABEL_CONFIG = """
<View>
  <Style>.prompt { margin: 4px }</Style>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Banana" background="#FF0000"/>
    <Label value="Orange" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana" smart="true" background="#000000" showInline="true"/>
    <Label value="Orange" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana" background="#000000" showInline="true"/>
    <Label value="Orange" background="#000000" showInline="true"/>
  </RectangleLabels>
  <View className="prompt">
    <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"
              showSubmitButton="true"/>
  </View>
</View>
"""


def keypoint(x: float, y: float, positive: bool = True, label: str = "Banana") -> dict:
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.78125, "keypointlabels": [label]},
            "is_positive": positive, "id": f"kp{x:g}{y:g}", "from_name": "tag2",
            "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def rectangle(x: float, y: float, w: float, h: float, label: str = "Orange") -> dict:
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]},
            "id": "rect1", "from_name": "tag3", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual"}


def textarea(text: str) -> dict:
    return {"value": {"text": [text]}, "id": "txt1", "from_name": "prompt", "to_name": "image",
            "type": "textarea", "origin": "manual"}


def predict_body(*regions: dict, image: str = "/data/upload/3/5e1f0a2b-photo.png") -> dict:
    """What Label Studio POSTs to <backend>/predict for one interactive click."""
    return {
        "tasks": [{"id": 17, "data": {"image": image}, "meta": {}, "annotations": [],
                   "predictions": [], "created_at": "2026-11-30T10:00:00.000000Z",
                   "updated_at": "2026-11-30T10:00:00.000000Z", "is_labeled": False,
                   "overlap": 1, "inner_id": 1, "total_annotations": 0,
                   "cancelled_annotations": 0, "total_predictions": 0, "project": 3,
                   "updated_by": None, "file_upload": 9, "comment_count": 0,
                   "unresolved_comment_count": 0, "last_comment_updated_at": None,
                   "comment_authors": []}],
        "model_version": "INITIAL",
        "project": "3.1764496800",
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None,
                   "context": {"result": list(regions)} if regions else None},
    }


def known_mask() -> np.ndarray:
    """An irregular mask: a disc, a hole, a thin line, a lone pixel and the image's corner."""
    yy, xx = np.mgrid[:H, :W]
    m = (yy - 40) ** 2 + (xx - 60) ** 2 < 30**2
    m &= (yy - 40) ** 2 + (xx - 60) ** 2 >= 6**2
    m[80, 5:120] = True
    m[3, 100] = True
    m[-4:, -4:] = True
    return m


class FakeSegment:
    """The Ingress's segment_one: records each request, answers our response dict."""

    def __init__(self, mask: np.ndarray | None = None):
        self.mask = known_mask() if mask is None else mask
        self.calls: list = []

    async def __call__(self, req, rid: str) -> dict:
        self.calls.append((req, rid))
        h, w = self.mask.shape
        cands = [] if req.mode == "text" else [
            {"index": i, "predicted_iou": s, "text_iou": None, "mask": None}
            for i, s in enumerate((0.61, 0.93, 0.72))]
        return {"request_id": rid, "image_id": "0" * 64, "width": w, "height": h,
                "mode": req.mode, "mask_format": req.mask_format, "mask": rle.encode(self.mask),
                "selected": None if req.mode == "text" else 1, "strategy": "fake",
                "agreement": 0.8 if req.mode != "point" else None, "candidates": cands,
                "text_mask": None, "cache": "miss", "text_cache": None, "timings_ms": {},
                "model": {"sam": "sam-tiny", "text": "evf-tiny"}}


async def fake_info() -> dict:
    return {"model": {"sam": "sam-tiny", "text": "evf-tiny"}, "text_model": True}


class ImageServer:
    """httpx.MockTransport standing in for Label Studio and other hosts: records requests."""

    def __init__(self, routes: dict[str, tuple[int, bytes]] | None = None):
        self.routes = routes if routes is not None else {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, content = self.routes.get(str(request.url), (404, b"no such file"))
        return httpx.Response(status, content=content)

    def fetcher(self, base_url=LS_URL, token=LS_TOKEN, max_bytes=2**20) -> ImageFetcher:
        return ImageFetcher(base_url, token, max_bytes=max_bytes,
                            transport=httpx.MockTransport(self))


def backend(server: ImageServer | None = None, segment: FakeSegment | None = None,
            **kwargs) -> tuple[LabelStudioBackend, FakeSegment, ImageServer]:
    server = server or ImageServer({f"{LS_URL}/data/upload/3/5e1f0a2b-photo.png": (200, PNG)})
    segment = segment or FakeSegment()
    return LabelStudioBackend(segment, fake_info, server.fetcher(), **kwargs), segment, server


def run(coro):
    return asyncio.run(coro)


def ls_decoded(rle_ints: list[int], h: int, w: int) -> np.ndarray:
    """Label Studio's brush RLE -> HxWx4 uint8, by the SDK's decoder."""
    flat = decode_rle(rle_ints)
    assert flat.size == h * w * 4
    return flat.reshape(h, w, 4)


# --- /predict -------------------------------------------------------------------------------


def test_predict_converts_the_context_and_answers_label_studio_brush_rle():
    ls, seg, server = backend()
    body = predict_body(keypoint(25, 50), keypoint(75, 25, positive=False),
                        rectangle(10, 20, 50, 50), textarea("  the orange on the left "))
    out = run(ls.predict(body, "rid-1"))

    # the image: a Label Studio path joined to LABEL_STUDIO_URL, with its token
    (request,) = server.requests
    assert str(request.url) == f"{LS_URL}/data/upload/3/5e1f0a2b-photo.png"
    assert request.headers["authorization"] == f"Token {LS_TOKEN}"
    # the prompt: percent of the image -> pixels; Alt-click (is_positive false) -> label 0
    (req, rid), = seg.calls
    assert rid == "rid-1" and req.image == PNG and req.image_id is None
    assert req.points == [(32.0, 48.0), (96.0, 24.0)] and req.point_labels == [1, 0]
    assert req.box == pytest.approx((12.8, 19.2, 76.8, 67.2))
    assert req.text == "the orange on the left" and req.mode == "biprompt"
    assert req.mask_format == "rle"

    assert set(out) == {"results"} and len(out["results"]) == 1
    pred = out["results"][0]
    assert set(pred) == {"result", "model_version", "score"}
    assert pred["model_version"] == "BiPrompt-SAM:sam-tiny+evf-tiny"
    assert pred["score"] == pytest.approx(0.93)  # SAM's IoU of the selected candidate
    (region,) = pred["result"]
    assert {k: v for k, v in region.items() if k not in ("value", "id")} == {
        "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": W,
        "original_height": H, "image_rotation": 0, "score": pytest.approx(0.93),
        "readonly": False}
    value = region["value"]
    assert value["format"] == "rle" and value["brushlabels"] == ["Orange"]  # the rectangle's
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in value["rle"])
    rgba = ls_decoded(value["rle"], H, W)
    mask = known_mask()
    assert np.array_equal(rgba[..., 3] > 0, mask)
    for c in range(4):  # every channel 255 on the mask, 0 off it
        assert np.array_equal(rgba[..., c], mask.astype(np.uint8) * 255)


@pytest.mark.parametrize("regions, mode", [
    ((keypoint(10, 10),), "point"),
    ((rectangle(0, 0, 100, 100, label="Banana"),), "point"),
    ((textarea("a fruit"),), "text"),
    ((keypoint(10, 10), textarea("a fruit")), "biprompt"),
])
def test_the_mode_follows_what_the_annotator_gave(regions, mode):
    ls, seg, _ = backend()
    out = run(ls.predict(predict_body(*regions), "r"))
    (req, _), = seg.calls
    assert req.mode == mode
    assert (req.text is None) == (mode == "point")
    assert (req.points == [] and req.box is None) == (mode == "text")
    (region,) = out["results"][0]["result"]
    assert region["value"]["brushlabels"] == ["Banana"]  # the keypoint's, or the first one
    if mode == "text":  # no SAM candidates: the agreement is the score
        assert out["results"][0]["score"] == pytest.approx(0.8)


def test_coordinates_are_clamped_into_the_image_and_rectangles_rotate():
    ls, seg, _ = backend()
    rotated = rectangle(50, 10, 20, 40)
    rotated["value"]["rotation"] = 90  # clockwise about its top-left corner
    run(ls.predict(predict_body(keypoint(100, 100), keypoint(-3, 0), rotated), "r"))
    (req, _), = seg.calls
    (x0, y0), (x1, y1) = req.points
    assert W - 1 < x0 < W and H - 1 < y0 < H and (x1, y1) == (0.0, 0.0)
    # 25.6 x 38.4 px at (64, 9.6), turned 90 degrees: x spans 64-38.4 .. 64, y 9.6 .. 9.6+25.6
    assert req.box == pytest.approx((25.6, 9.6, 64.0, 35.2))
    ls2, seg2, _ = backend()
    run(ls2.predict(predict_body(rectangle(80, 90, 40, 30)), "r"))
    assert seg2.calls[0][0].box == pytest.approx((102.4, 86.4, W, H))


def test_a_label_the_brush_control_lacks_falls_back_to_its_first():
    ls, _, _ = backend()
    out = run(ls.predict(predict_body(keypoint(20, 20, label="Kiwi")), "r"))
    assert out["results"][0]["result"][0]["value"]["brushlabels"] == ["Banana"]


def test_no_context_or_nothing_to_prompt_with_is_no_prediction():
    ls, seg, server = backend()
    assert run(ls.predict(predict_body(), "r")) == {"results": []}
    brush = {"type": "brushlabels", "from_name": "tag", "to_name": "image",
             "value": {"format": "rle", "rle": [0, 0], "brushlabels": ["Banana"]}}
    assert run(ls.predict(predict_body(brush, textarea("   ")), "r")) == {"results": []}
    assert seg.calls == []


def test_an_empty_mask_is_a_prediction_without_regions():
    ls, _, _ = backend(segment=FakeSegment(np.zeros((H, W), bool)))
    out = run(ls.predict(predict_body(keypoint(50, 50)), "r"))
    assert out["results"][0]["result"] == []


def test_context_at_the_top_level_is_read_too():
    ls, seg, _ = backend()
    body = predict_body()
    body["context"] = {"result": [keypoint(50, 50)]}
    run(ls.predict(body, "r"))
    assert seg.calls[0][0].points == [(64.0, 48.0)]


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url, target, token", [
    ("/data/upload/3/a.png", f"{LS_URL}/data/upload/3/a.png", True),
    ("upload/3/a.png", f"{LS_URL}/data/upload/3/a.png", True),
    ("/data/local-files/?d=images/cats/1.jpg", f"{LS_URL}/data/local-files/?d=images/cats/1.jpg",
     True),
    (f"{LS_URL}/data/upload/3/a.png", f"{LS_URL}/data/upload/3/a.png", True),
    ("https://images.example.com/cats/1.jpg?sig=abc", "https://images.example.com/cats/1.jpg?sig=abc",
     False),  # another origin: never the token
    ("http://label-studio.internal:9999/a.png", "http://label-studio.internal:9999/a.png", False),
])
def test_urls_are_joined_to_label_studio_and_only_it_gets_the_token(url, target, token):
    server = ImageServer({target: (200, PNG)})
    got = run(server.fetcher()(url, 17))
    assert got == PNG
    (request,) = server.requests
    assert str(request.url) == target
    assert request.headers.get("authorization") == (f"Token {LS_TOKEN}" if token else None)


def test_cloud_storage_uris_go_through_label_studio_presign():
    uri = "s3://bucket/cats/1.jpg"
    target = f"{LS_URL}/tasks/17/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    server = ImageServer({target: (200, PNG)})
    assert run(server.fetcher()(uri, 17)) == PNG


def test_an_unreachable_image_is_a_502_naming_the_url_without_its_query():
    port = free_port()  # nothing listens there
    fetch = ImageFetcher(None, None, max_bytes=2**20, timeout_s=5)
    ls, seg, _ = backend()
    ls.fetch_image = fetch
    with pytest.raises(UpstreamError) as info:
        run(ls.predict(predict_body(keypoint(50, 50),
                                    image=f"http://127.0.0.1:{port}/x.png?token=secret"), "r"))
    assert info.value.status_code == 502 and info.value.type == "upstream_error"
    assert f"http://127.0.0.1:{port}/x.png" in info.value.message
    assert "secret" not in info.value.message and seg.calls == []


def test_image_errors_have_their_status():
    server = ImageServer({f"{LS_URL}/data/upload/3/text.png": (200, b"not an image at all"),
                          f"{LS_URL}/data/upload/3/denied.png": (401, b"")})
    ls, seg, _ = backend(server)
    cases = [
        ("/data/upload/3/missing.png", UpstreamError, "answered HTTP 404"),
        ("/data/upload/3/denied.png", UpstreamError, "check LABEL_STUDIO_API_KEY"),
        ("/data/upload/3/text.png", InvalidImageError, "not an image"),
        ("ftp://host/a.png", InvalidInputError, "unsupported image URL"),
    ]
    for url, error, words in cases:
        with pytest.raises(error, match=words):
            run(ls.predict(predict_body(keypoint(50, 50), image=url), "r"))
    body = predict_body(keypoint(50, 50))
    body["tasks"][0]["data"] = {"img": "/data/upload/3/a.png"}
    with pytest.raises(InvalidInputError, match=r"data\.image .* is missing"):
        run(ls.predict(body, "r"))
    assert seg.calls == []


def test_label_studio_paths_need_label_studio_url():
    with pytest.raises(InvalidInputError, match="set LABEL_STUDIO_URL"):
        ImageServer().fetcher(base_url=None).resolve("/data/upload/3/a.png")


def test_the_image_size_limit_holds_with_and_without_content_length():
    big = b"\x89PNG" + bytes(4096)
    declared = ImageServer({f"{LS_URL}/a.png": (200, big)}).fetcher(max_bytes=1024)
    with pytest.raises(PayloadTooLargeError, match="limit is 1024"):
        run(declared("/a.png"))

    def streamed(request):  # no Content-Length: counted while it streams
        return httpx.Response(200, stream=httpx.ByteStream(big), headers={})

    fetch = ImageFetcher(LS_URL, None, max_bytes=1024, transport=httpx.MockTransport(streamed))
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit of 1024"):
        run(fetch("/a.png"))


def test_the_mask_is_in_the_image_as_displayed():
    # a JPEG stored 128x96 with EXIF orientation 6 (rotate 90): displayed 96 wide, 128 high
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(scene(5, H, W)).save(buf, format="JPEG", exif=exif)
    server = ImageServer({f"{LS_URL}/data/upload/3/phone.jpg": (200, buf.getvalue())})
    ls, seg, _ = backend(server, FakeSegment(np.ones((W, H), bool)))
    out = run(ls.predict(predict_body(keypoint(50, 25), image="/data/upload/3/phone.jpg"), "r"))
    assert seg.calls[0][0].points == [(48.0, 32.0)]
    region = out["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (H, W)


# --- label config ---------------------------------------------------------------------------


def test_the_label_config_names_the_controls():
    c = parse_label_config(LABEL_CONFIG)
    assert (c.brush, c.image, c.data_key, c.labels) == ("tag", "image", "image",
                                                        ("Banana", "Orange"))
    two = """<View><Image name="a" value="$left"/><Image name="b" value="$right"/>
      <brushlabels name="ba" toName="a"><Label value="x"/></brushlabels>
      <BrushLabels name="bb" toName="b"><Label value="y"/></BrushLabels></View>"""
    assert parse_label_config(two, "b").data_key == "right"
    assert parse_label_config(two).brush == "ba"


@pytest.mark.parametrize("config, words", [
    ("", "no label config"),
    ("<View><Image", "not valid XML"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>',
     "no <BrushLabels"),
    ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>', "no <Label>"),
    ('<View><Image name="i" value="i"/><BrushLabels name="b" toName="i"><Label value="x"/>'
     "</BrushLabels></View>", 'value="\\$<data key>"'),
    ('<!DOCTYPE v [<!ENTITY e "x">]><View/>', "DTDs"),
])
def test_label_configs_we_cannot_answer_are_422(config, words):
    with pytest.raises(InvalidInputError, match=words):
        parse_label_config(config)


# --- /setup, /health, /webhook, auth --------------------------------------------------------


def test_setup_health_and_webhook_shapes():
    ls, _, _ = backend()
    setup = {"project": "3.1764496800", "schema": LABEL_CONFIG, "hostname": LS_URL,
             "access_token": LS_TOKEN, "model_version": None, "extra_params": ""}
    assert run(ls.setup(setup)) == {"model_version": "BiPrompt-SAM:sam-tiny+evf-tiny"}
    bad = copy.deepcopy(setup) | {"schema": "<View><Image name='i' value='$i'/></View>"}
    with pytest.raises(InvalidInputError, match="no <BrushLabels"):
        run(ls.setup(bad))
    assert ls.health() == {"status": "UP", "model_class": "BiPromptSAM"}
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": LABEL_CONFIG},
             "annotation": {"id": 1, "result": []}}
    answer = ls.webhook(event)
    assert answer["status"] == "ok" and answer["result"]["trained"] is False
    assert "does not train" in answer["result"]["message"]
    assert ls.webhook({"action": "PROJECT_UPDATED"}) == {"status": "Unknown event"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_auth_takes_basic_or_the_api_key_and_is_open_without_either():
    backend()[0].authorize(None)
    ls = backend(basic_auth=("ls", "s3cret:x"), api_key="key-1")[0]
    ls.authorize(basic("ls", "s3cret:x"))
    ls.authorize("Bearer key-1")
    for header in (None, basic("ls", "wrong"), basic("other", "s3cret:x"), "Basic !!!",
                   "Bearer nope", "Token key-1"):
        with pytest.raises(BasicAuthError):
            ls.authorize(header)
    only_key = backend(api_key="key-1")[0]
    with pytest.raises(Exception) as info:
        only_key.authorize(basic("ls", "key-1"))
    assert info.value.status_code == 401 and not isinstance(info.value, BasicAuthError)


def test_errors_reach_label_studio_as_our_body_with_the_right_challenge():
    ls = backend(basic_auth=("ls", "pw"))[0]

    async def guarded(request: Request):
        ls.authorize(request.headers.get("authorization"))
        raise UpstreamError("could not fetch the image http://x/y.png")

    api.add_api_route("/__test/ls", guarded, methods=["POST"])
    try:
        with TestClient(api, raise_server_exceptions=True) as c:
            r = c.post("/__test/ls", content=b"{}", headers={"X-Request-ID": "ls-1"})
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == 'Basic realm="label-studio"'
            assert r.json()["error"]["request_id"] == "ls-1"
            r = c.post("/__test/ls", content=b"{}", headers={"Authorization": basic("ls", "pw")})
            assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    finally:
        api.router.routes[:] = [r for r in api.router.routes
                                if getattr(r, "path", "") != "/__test/ls"]

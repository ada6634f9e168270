"""The Serve graph end to end over HTTP: results equal the in-process pipeline's, the caches do
what they promise (and fail safe), and every bad input gets its status and error body."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import numpy as np
import pytest
import torch
from biprompt_client import rle
from PIL import Image
from pycocotools import mask as mask_utils

from biprompt.cache import embedding_key, image_id, pack_embedding, unpack_embedding
from tests.integration.conftest import (
    API_KEY,
    assert_close_rle,
    assert_threads_pinned,
    png_bytes,
    scene,
    stats,
)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    data = {**body}
    if isinstance(data.get("image"), bytes):
        data["image"] = base64.b64encode(data["image"]).decode()
    return httpx.post(url, content=json.dumps(data), timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def coco_decode(r: dict) -> np.ndarray:
    return mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)


def check_against(res: dict, expected, with_text: bool = True) -> None:
    """HTTP result == in-process SegmentResult, mask for mask."""
    assert np.array_equal(coco_decode(res["mask"]), expected.mask)
    assert np.array_equal(rle.decode(res["mask"]), expected.mask)
    assert res["selected"] == expected.selected
    assert res["strategy"] == expected.strategy
    for c, exp_mask, score in zip(res["candidates"], expected.candidates,
                                  expected.candidate_scores, strict=True):
        assert np.array_equal(coco_decode(c["mask"]), exp_mask)
        assert c["predicted_iou"] == pytest.approx(float(score), abs=1e-5)
    if expected.text_mask is None:
        assert res["text_mask"] is None and res["text_cache"] is None
    if with_text:
        assert np.array_equal(coco_decode(res["text_mask"]), expected.text_mask)
        assert res["agreement"] == pytest.approx(expected.agreement, abs=1e-9)


FULL = {"return_candidates": True, "return_text_mask": True}


def test_float32_result_equals_in_process_pipeline(strict_url, tiny_pipeline):
    img = scene(1)
    body = {"image": png_bytes(img), "points": [[150.0, 100.0]], "text": "the red circle", **FULL}
    res = post(f"{strict_url}/v1/segment", body, AUTH)
    assert res.status_code == 200, res.text
    res = res.json()
    assert_threads_pinned("strict")
    expected = tiny_pipeline.segment(img, [[150.0, 100.0]], text="the red circle")
    check_against(res, expected)
    assert res["image_id"] == image_id(body["image"])
    assert (res["height"], res["width"]) == img.shape[:2]
    assert res["model"] == tiny_pipeline.model_ids


@pytest.mark.parametrize("mode", ["biprompt", "point", "text"])
def test_float16_result_equals_pipeline_on_the_same_embedding(main_url, tiny_pipeline, mode):
    """The production app ships fp16 embeddings: same inputs = the fp16-rounded embedding."""
    img = scene(2)
    points, labels = [[60.0, 50.0], [200.0, 150.0]], [1, 0]
    body = {"image": png_bytes(img), "points": points, "point_labels": labels,
            "text": "the blue square", "mode": mode, **FULL}
    res = post(f"{main_url}/v1/segment", body)
    assert res.status_code == 200, res.text
    assert_threads_pinned("main")
    emb = unpack_embedding(pack_embedding(tiny_pipeline.embed(img), "float16"))
    emb.embedding = emb.embedding.float()
    expected = tiny_pipeline.segment(emb, points, labels, text="the blue square", mode=mode)
    check_against(res.json(), expected, with_text=mode != "point")


def test_box_only_and_text_only_requests(main_url, tiny_pipeline):
    img = scene(3)
    box = [20.0, 30.0, 180.0, 160.0]
    res = post(f"{main_url}/v1/segment", {"image": png_bytes(img), "box": box, "mode": "point"})
    assert res.status_code == 200, res.text
    assert res.json()["strategy"] == "point"
    res = post(f"{main_url}/v1/segment", {"image": png_bytes(img), "text": "the circle",
                                          "mode": "text"}).json()
    assert res["candidates"] == [] and res["selected"] is None and res["strategy"] == "text"
    expected = tiny_pipeline.segment(img, text="the circle", mode="text")
    assert rle.decode(res["mask"]).shape == expected.mask.shape


def test_second_request_is_a_cache_hit_and_skips_the_encoder(main_url, redis_srv):
    data = png_bytes(scene(10))
    first = post(f"{main_url}/v1/segment", {"image": data, "points": [[10, 10]]}).json()
    assert first["cache"] == "miss" and "encoder" in first["timings_ms"]
    before = stats("main", "ImageEncoder")["images"]
    second = post(f"{main_url}/v1/segment", {"image": data, "points": [[30, 40]]}).json()
    assert second["cache"] == "hit" and "encoder" not in second["timings_ms"]
    assert stats("main", "ImageEncoder")["images"] == before
    # the Ingress's waits on the models and the Selector cover their compute (the rest: hops)
    t = second["timings_ms"]
    # no text: the join ran on the PointDecoder (no Selector hop), inside the models' wait
    assert "selector_wait" not in t and t["models_wait"] >= t["point_decoder"] + t["selector"]
    third = post(f"{main_url}/v1/segment", {"image": data, "points": [[30, 40]],
                                            "text": "a box"}).json()
    t = third["timings_ms"]  # a new text: both models, then the Selector
    assert third["text_cache"] == "miss" and t["selector_wait"] >= t["selector"]
    assert t["models_wait"] >= max(t["point_decoder"], t["text_model"])
    assert t["total"] >= t["models_wait"] + t["selector_wait"]
    # the embedding lives in Redis under the documented key, in the documented format
    blob = redis_srv.client().get(embedding_key(first["model"]["sam"], first["image_id"]))
    assert unpack_embedding(blob).embedding.dtype == torch.float16
    # and by image_id, without the image
    by_id = post(f"{main_url}/v1/segment", {"image_id": first["image_id"], "points": [[5, 5]]})
    assert by_id.status_code == 200 and by_id.json()["cache"] == "hit"


def test_concurrent_requests_for_one_new_image_make_one_encoder_call(main_url):
    data = png_bytes(scene(11))
    before = stats("main", "ImageEncoder")["images"]
    body = {"image": data, "points": [[100, 100]], "text": "the green triangle"}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(f"{main_url}/v1/segment", body), range(8)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert stats("main", "ImageEncoder")["images"] - before == 1
    # one embedding, but the decoders may batch the eight prompts in any grouping
    first = results[0].json()["mask"]
    for r in results[1:]:
        assert_close_rle(r.json()["mask"], first)


def test_same_text_twice_skips_the_text_model(main_url):
    data = png_bytes(scene(12))
    body = {"image": data, "points": [[40, 40]], "text": "the large red square"}
    first = post(f"{main_url}/v1/segment", body).json()
    assert first["text_cache"] == "miss"
    before = stats("main", "TextMask")["pairs"]
    second = post(f"{main_url}/v1/segment", {**body, "points": [[200, 120]],
                                            "text": "  the large red square "}).json()
    assert second["text_cache"] == "hit"
    assert "text_model" not in second["timings_ms"]
    assert stats("main", "TextMask")["pairs"] == before
    third = post(f"{main_url}/v1/segment", {**body, "text": "the small blue circle"}).json()
    assert third["text_cache"] == "miss"
    assert stats("main", "TextMask")["pairs"] == before + 1


def test_redis_down_serves_without_cache_and_resumes(fault_url, fault_redis):
    data = png_bytes(scene(13))
    body = {"image": data, "points": [[50, 60]], "text": "the circle"}
    ok = post(f"{fault_url}/v1/segment", body).json()
    fault_redis.kill()
    try:
        down = [post(f"{fault_url}/v1/segment", body) for _ in range(3)]
        assert [r.status_code for r in down] == [200, 200, 200]
        assert all(r.json()["cache"] == "miss" for r in down)
        assert all(r.json()["mask"] == ok["mask"] for r in down)  # correctness is untouched
    finally:
        fault_redis.start()  # the same port: the app's stores reconnect on their own
    # past the stores' cool-down (2 s) they write again, and the request after that hits
    deadline, again = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        again = post(f"{fault_url}/v1/segment", body).json()
        if again["cache"] == "hit" and again["text_cache"] == "hit":
            break
        time.sleep(0.2)
    assert again["cache"] == "hit" and again["text_cache"] == "hit", again
    assert again["mask"] == ok["mask"]


def test_corrupted_cache_value_is_recomputed(main_url, redis_srv):
    data = png_bytes(scene(14))
    first = post(f"{main_url}/v1/segment", {"image": data, "points": [[70, 80]]}).json()
    key = embedding_key(first["model"]["sam"], first["image_id"])
    r = redis_srv.client()
    r.set(key, r.get(key)[:-100])  # truncated
    before = stats("main", "ImageEncoder")["images"]
    second = post(f"{main_url}/v1/segment", {"image": data, "points": [[70, 80]]}).json()
    assert second["cache"] == "miss" and second["mask"] == first["mask"]
    assert stats("main", "ImageEncoder")["images"] == before + 1
    unpack_embedding(r.get(key))  # rewritten whole
    r.set(key, b"garbage")
    assert post(f"{main_url}/v1/segment", {"image_id": first["image_id"],
                                           "points": [[1, 1]]}).status_code == 404


def test_msgpack_bodies_carry_raw_bytes(main_url):
    data = png_bytes(scene(15))
    body = msgpack.packb({"image": data, "points": [[20.0, 20.0]], "mask_format": "png"})
    r = httpx.post(f"{main_url}/v1/segment", content=body, timeout=60,
                   headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 200, r.content[:300]
    assert r.headers["content-type"].startswith("application/msgpack")
    res = msgpack.unpackb(r.content)
    assert res["mask"][:8] == b"\x89PNG\r\n\x1a\n"
    j = post(f"{main_url}/v1/segment", {"image": data, "points": [[20, 20]]}).json()
    png = np.asarray(Image.open(io.BytesIO(res["mask"]))) > 0
    assert np.array_equal(png, rle.decode(j["mask"]))


def test_embed_then_segment_by_id(main_url):
    data = png_bytes(scene(16))
    r = post(f"{main_url}/v1/embed", {"image": data})
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["image_id"] == image_id(data) and e["cache"] == "miss"
    assert post(f"{main_url}/v1/embed", {"image": data}).json()["cache"] == "hit"
    s = post(f"{main_url}/v1/segment", {"image_id": e["image_id"], "points": [[9, 9]]}).json()
    assert s["cache"] == "hit"


def test_batch_endpoint_keeps_order_and_isolates_errors(main_url):
    data = png_bytes(scene(17))
    items = [{"image": base64.b64encode(data).decode(), "points": [[10 * i + 5, 20]]}
             for i in range(5)]
    items[2]["points"] = [[5000, 5]]
    items[3] = {"image_id": "f" * 64, "points": [[1, 1]]}
    r = httpx.post(f"{main_url}/v1/segment/batch", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 200, 422, 404, 200]
    assert results[2]["error"]["type"] == "invalid_prompt"
    assert results[0]["result"]["image_id"] == image_id(data)
    single = post(f"{main_url}/v1/segment", {"image": data, "points": [[45, 20]]}).json()
    assert_close_rle(results[4]["result"]["mask"], single["mask"])  # batched vs alone


def test_models_and_health(main_url):
    m = httpx.get(f"{main_url}/v1/models").json()
    assert m["model"]["sam"].startswith("sam-tiny") and m["text_model"] is True
    assert m["cache"].startswith("redis")
    h = httpx.get(f"{main_url}/healthz").json()
    assert h["status"] == "ok"
    assert httpx.get(f"{main_url}/openapi.json").json()["paths"]["/v1/segment"]["post"]


def test_prometheus_exports_our_metrics(main_url, metrics_port):
    body = {"image": png_bytes(scene(18)), "points": [[3, 3]], "text": "the square"}
    assert [post(f"{main_url}/v1/segment", body).json()["cache"] for _ in range(2)] == [
        "miss", "hit"]
    # exported every second or so: wait for every series asserted on below
    wanted = ["biprompt_cache_lookups", "biprompt_encoder_images", "biprompt_text_model_pairs",
              "biprompt_batch_size", "biprompt_selection", "biprompt_selection_agreement",
              'outcome="hit"', "serve_deployment_processing_latency_ms"]
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"not exported: {missing}"

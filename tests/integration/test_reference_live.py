"""The reference expert served: a reference image and its annotation (mask, point or box) vote
with the text on SAM's candidates; results equal the in-process pipeline's; the reference is
encoded once for every later target; bad references fail alone with their status."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from biprompt_client import BiPromptClient, rle

from biprompt.cache import image_id, pack_embedding, unpack_embedding
from biprompt.engines.reference_mask import features_from_bytes, features_to_bytes
from tests.integration.conftest import assert_threads_pinned, png_bytes, scene, stats

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", json=body, timeout=60)


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def fp16(pipe, img):
    emb = unpack_embedding(pack_embedding(pipe.embed(img), "float16"))
    emb.embedding = emb.embedding.float()
    return emb


def test_reference_votes_and_equals_the_in_process_pipeline(main_url, tiny_pipeline):
    ref_img, img = scene(71), scene(72)
    ref_m = box_mask(*ref_img.shape[:2], 40, 120, 60, 160)
    body = {"image": b64(png_bytes(img)), "points": [[150.0, 100.0]], "text": "the red circle",
            "reference": {"image": b64(png_bytes(ref_img)), "mask": rle.encode(ref_m)},
            "return_candidates": True, "return_expert_masks": True}
    r = post(main_url, body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert_threads_pinned("main")
    # in process, on what the app computes on: fp16 embeddings and fp16 (cached) features
    pipe = tiny_pipeline
    ref = pipe.encode_reference(fp16(pipe, ref_img), mask=ref_m)
    mid = pipe.reference.model_id
    ref.features = features_from_bytes(features_to_bytes(ref.features, mid), mid)
    expected = pipe.segment(fp16(pipe, img), [[150.0, 100.0]], text="the red circle",
                            reference=ref)
    assert np.array_equal(rle.decode(res["reference_mask"]), expected.expert_masks["reference"])
    assert np.array_equal(rle.decode(res["text_mask"]), expected.text_mask)
    assert np.array_equal(rle.decode(res["mask"]), expected.mask)
    assert res["selected"] == expected.selected and res["strategy"] == expected.strategy
    for c in res["candidates"]:
        assert set(c["expert_ious"]) == {"text", "reference"}
        for name in ("text", "reference"):
            assert c["expert_ious"][name] == pytest.approx(
                float(expected.expert_ious[name][c["index"]]), abs=1e-9)
    assert res["expert_agreement"] == pytest.approx(expected.expert_agreement, abs=1e-9)
    assert res["reference_cache"] == "miss"
    assert res["model"]["reference"] == mid


def test_a_reference_is_encoded_once_for_many_targets(main_url):
    ref_img = scene(81)
    ref = {"image": b64(png_bytes(ref_img)),
           "mask": rle.encode(box_mask(*ref_img.shape[:2], 20, 90, 30, 140))}
    before = stats("main", "ReferenceMask")["references_encoded"]
    for seed in (82, 83, 84):
        res = post(main_url, {"image": b64(png_bytes(scene(seed))), "points": [[100.0, 80.0]],
                              "reference": ref}).json()
        assert res["reference_cache"] == "miss", res
    # by image id now: the reference image's embedding is cached too
    ref_id = {"image_id": image_id(png_bytes(ref_img)), "mask": ref["mask"]}
    again = post(main_url, {"image": b64(png_bytes(scene(82))), "points": [[100.0, 80.0]],
                            "reference": ref_id}).json()
    assert again["reference_cache"] == "hit"  # that target's mask is cached: no model call
    assert "selector_wait" not in again["timings_ms"]  # every expert known: joined on the decoder
    after = stats("main", "ReferenceMask")["references_encoded"]
    assert after - before == 1


@pytest.mark.parametrize("annotation", [{"points": [[100.0, 70.0]]},
                                        {"box": [50.0, 30.0, 160.0, 110.0]}])
def test_point_and_box_annotations(main_url, annotation):
    ref_img = scene(91)
    body = {"image": b64(png_bytes(scene(92))), "mode": "reference",
            "reference": {"image": b64(png_bytes(ref_img)), **annotation}}
    r = post(main_url, body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["strategy"] == "reference" and res["candidates"] == []
    assert rle.decode(res["mask"]).shape == scene(92).shape[:2]


def test_bad_references_get_their_status_and_fail_alone(main_url):
    img, ref_img = png_bytes(scene(101)), png_bytes(scene(102))
    good = {"image": b64(img), "points": [[100.0, 80.0]]}
    h, w = scene(102).shape[:2]
    cases = [
        ({"image": b64(ref_img), "mask": rle.encode(np.zeros((h + 1, w), bool))}, 422,
         "reference image is"),
        ({"image": b64(ref_img), "mask": rle.encode(np.zeros((h, w), bool))}, 422, "empty"),
        ({"image": b64(ref_img), "points": [[w + 10.0, 5.0]]}, 422, "outside"),
        ({"image_id": "0" * 64, "box": [1, 1, 20, 20]}, 404, "unknown image_id"),
        ({"image": b64(ref_img)}, 422, "reference"),
    ]
    for ref, status, match in cases:
        r = post(main_url, {**good, "reference": ref})
        assert r.status_code == status, (ref, r.text)
        assert match in r.json()["error"]["message"], r.text
    r = post(main_url, {**good, "mode": "reference"})
    assert r.status_code == 422 and "needs a `reference`" in r.json()["error"]["message"]
    # in a batch: the bad item fails, its neighbours don't
    items = [{**good, "reference": {"image": b64(ref_img), "mask": rle.encode(
        box_mask(h, w, 10, 60, 10, 90))}}, {**good, "reference": cases[0][0]}, good]
    out = httpx.post(f"{main_url}/v1/segment/batch", json={"items": items}, timeout=60).json()
    assert [x["status"] for x in out["results"]] == [200, 422, 200]


def test_the_sdk_sends_a_reference(main_url):
    ref_img = scene(111)
    with BiPromptClient(main_url, max_retries=1) as client:
        seg = client.segment(scene(112), points=[[120, 90]], text="the red circle",
                             reference={"image": ref_img,
                                        "mask": box_mask(*ref_img.shape[:2], 30, 100, 40, 150)},
                             return_expert_masks=True)
    assert seg.reference_mask is not None and seg.reference_mask.shape == scene(112).shape[:2]
    assert all(set(c.expert_ious) == {"text", "reference"} for c in seg.candidates)
    assert seg.expert_agreement is None or 0.0 <= seg.expert_agreement <= 1.0

"""Refinement clicks through the served app: the logits stay on the server under a short-lived
`logits_id`; a refinement click costs no encoder pass and moves a few KB."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from biprompt_client import BiPromptClient, rle

from tests.integration.conftest import png_bytes, scene, stats

pytestmark = pytest.mark.integration
MAX_CLICK_BYTES = 64 * 1024


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)


def test_refinement_by_logits_id_costs_no_encoder_pass_and_few_bytes(main_url):
    png = png_bytes(scene(8101))
    first = _post(main_url, {"image": base64.b64encode(png).decode(), "points": [[60, 50]],
                             "text": "the box", "logits": "id"})
    assert first.status_code == 200, first.text
    one = first.json()
    assert len(one["logits_id"]) == 32 and one["logits_size"] > 0
    before = stats("main", "ImageEncoder")["images"]
    body = {"image_id": one["image_id"], "points": [[60, 50], [200, 150]], "point_labels": [1, 0],
            "mask_input_id": one["logits_id"], "logits": "id", "mode": "point"}
    sent = json.dumps(body).encode()
    second = _post(main_url, body)
    assert second.status_code == 200, second.text
    two = second.json()
    assert stats("main", "ImageEncoder")["images"] == before  # no encoder pass
    assert two["cache"] == "hit" and len(two["candidates"]) == 1  # SAM's single mask
    assert two["logits_id"] != one["logits_id"]
    print(f"\nrefinement click: {len(sent)} B sent, {len(second.content)} B received")
    assert len(sent) + len(second.content) < MAX_CLICK_BYTES


def test_raw_logits_sent_back_give_the_same_answer_as_their_id(main_url):
    png = png_bytes(scene(8102))
    with BiPromptClient(main_url) as client:
        a = client.segment(png, points=[[60, 50]], logits="raw", mode="point")
        b = client.segment(png, points=[[60, 50]], logits="id", mode="point")
        assert a.logits.shape == (a.raw["logits_size"],) * 2
        clicks = {"points": [[60, 50], [150, 120]], "labels": [1, 0], "mode": "point"}
        by_raw = client.segment(image_id=a.image_id, mask_input=a.logits, **clicks)
        by_id = client.segment(image_id=b.image_id, mask_input_id=b.logits_id, **clicks)
    # the same logits reach the decoder either way (float16 on the wire and in the cache)
    np.testing.assert_array_equal(by_raw.mask, by_id.mask)
    assert rle.decode(by_raw.raw["mask"]).shape == (240, 320)


def test_bad_mask_inputs_get_clear_errors(main_url):
    png = png_bytes(scene(8103))
    ok = _post(main_url, {"image": base64.b64encode(png).decode(), "points": [[60, 50]],
                          "logits": "id", "mode": "point"}).json()
    other = _post(main_url, {"image": base64.b64encode(png_bytes(scene(8104))).decode(),
                             "points": [[60, 50]], "mode": "point"}).json()
    base = {"points": [[60, 50]], "mode": "point"}
    unknown = _post(main_url, {**base, "image_id": ok["image_id"], "mask_input_id": "0" * 32})
    assert unknown.status_code == 404 and "mask_input_id" in unknown.json()["error"]["message"]
    foreign = _post(main_url, {**base, "image_id": other["image_id"],
                               "mask_input_id": ok["logits_id"]})
    assert foreign.status_code == 422 and "another image" in foreign.json()["error"]["message"]
    odd = _post(main_url, {**base, "image_id": ok["image_id"],
                           "mask_input": base64.b64encode(b"\0" * 30).decode()})
    assert odd.status_code == 422 and "float16" in odd.json()["error"]["message"]
    both = _post(main_url, {**base, "image_id": ok["image_id"], "mask_input_id": ok["logits_id"],
                            "mask_input": base64.b64encode(b"\0" * 32).decode()})
    assert both.status_code == 422

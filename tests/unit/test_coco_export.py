"""`biprompt batch --coco`: a COCO results file that pycocotools' `COCO.loadRes` accepts, against
the fake v1 server of test_client.py (httpx.MockTransport; no server, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from biprompt_client import BiPromptClient, cli, rle
from PIL import Image
from test_client import FakeServer, expected_mask, make_images

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402


@pytest.fixture
def server(monkeypatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(cli, "_client", lambda args: BiPromptClient(
        transport=httpx.MockTransport(fake), wire=args.wire))
    return fake


def write_requests(tmp_path: Path, lines: list[dict]) -> Path:
    for i, rgb in enumerate(make_images(2, h=24, w=32)):
        Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


LINES = [
    {"id": "a", "image": "img0.png", "points": [[8, 8]]},
    {"id": "b", "image": "img1.png", "points": [[20, 12]], "category_id": 3},
    {"id": "c", "image": "img0.png", "points": [[24, 16]], "text": "the thing"},
]


def batch(tmp_path: Path, requests: Path, *extra: str) -> int:
    return cli.main(["batch", str(requests), "--out", str(tmp_path / "out.jsonl"),
                     "--no-progress", *extra])


def ground_truth(images: list[dict], categories: list[int]) -> COCO:
    gt = COCO()
    gt.dataset = {"images": images, "annotations": [],
                  "categories": [{"id": c, "name": str(c)} for c in categories]}
    gt.createIndex()
    return gt


def test_coco_results_load_and_decode_to_the_responses_masks(tmp_path, server):
    requests = write_requests(tmp_path, LINES)
    coco_path = tmp_path / "coco.json"
    assert batch(tmp_path, requests, "--coco", str(coco_path)) == 0
    mapping = json.loads((tmp_path / "coco.images.json").read_text())["images"]
    # numbered by first appearance: img0 -> 1, img1 -> 2; sizes and sha256 from the responses
    assert [(m["id"], Path(m["file_name"]).name, m["height"], m["width"]) for m in mapping] == [
        (1, "img0.png", 24, 32), (2, "img1.png", 24, 32)]
    assert all(len(m["sha256"]) == 64 for m in mapping)
    res = ground_truth(mapping, [1, 3]).loadRes(str(coco_path))
    anns = res.loadAnns(res.getAnnIds())
    assert [(a["image_id"], a["category_id"]) for a in anns] == [(1, 1), (2, 3), (1, 1)]
    assert [a["score"] for a in anns] == [0.9, 0.9, 0.9]  # the fake's selected candidate 0
    out = {json.loads(t)["id"]: json.loads(t) for t in (tmp_path / "out.jsonl").read_text()
           .splitlines()}
    for line, ann in zip(LINES, anns, strict=True):
        decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert np.array_equal(decoded, rle.decode(out[line["id"]]["mask"]))
        assert np.array_equal(decoded, expected_mask(24, 32, line["points"]))
        assert ann["area"] == decoded.sum()
    # the coco keys stay on this side of the wire
    sent = [c.body for c in server.calls if c.path.startswith("/v1/segment")]
    assert sent and not any("category_id" in json.dumps(b, default=str) for b in sent)


def test_coco_image_ids_from_the_requests_and_resumed_batches(tmp_path, server):
    lines = [{**line, "coco_image_id": 100 + int(line["image"][3])} for line in LINES]
    requests = write_requests(tmp_path, lines[:2])
    coco_path = tmp_path / "coco.json"
    assert batch(tmp_path, requests, "--coco", str(coco_path)) == 0
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert batch(tmp_path, requests, "--coco", str(coco_path)) == 0  # runs only "c"
    assert not (tmp_path / "coco.images.json").exists()
    images = [{"id": i, "height": 24, "width": 32, "file_name": f"img{i - 100}.png"}
              for i in (100, 101)]
    res = ground_truth(images, [1, 3]).loadRes(str(coco_path))
    assert [a["image_id"] for a in res.loadAnns(res.getAnnIds())] == [100, 101, 100]


@pytest.mark.parametrize("bad, message", [
    ({"mask_format": "polygon"}, "needs COCO RLE masks"),
    ({"coco_image_id": 7}, "give it on every line or on none"),
    ({"category_id": "cat"}, "must be an integer"),
])
def test_coco_refuses_before_sending_anything(tmp_path, server, bad, message):
    requests = write_requests(tmp_path, [{**LINES[0], **bad}, LINES[1]])
    with pytest.raises(SystemExit, match=message):
        batch(tmp_path, requests, "--coco", str(tmp_path / "coco.json"))
    assert server.calls == [] and not (tmp_path / "coco.json").exists()


def test_coco_refuses_earlier_results_without_rle(tmp_path, server):
    requests = write_requests(tmp_path, LINES[:1])
    (tmp_path / "out.jsonl").write_text(json.dumps(
        {"id": "a", "ok": True, "image_id": "0" * 64, "mask": None, "selected": 0}) + "\n")
    with pytest.raises(SystemExit, match="no RLE mask"):
        batch(tmp_path, requests, "--coco", str(tmp_path / "coco.json"))


def test_coco_score_falls_back_to_the_agreement_then_one():
    assert cli.coco_score({"predicted_iou": 0.8, "agreement": 0.3}) == 0.8
    assert cli.coco_score({"predicted_iou": None, "agreement": 0.3}) == 0.3
    assert cli.coco_score({"agreement": None}) == 1.0

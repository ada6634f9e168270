"""The offline batch on Ray Data (serving/offline.py) against the served path, on the Ray the live
app runs on (one pytest process holds one Ray connection): the same requests file through
`biprompt batch` (the SDK, the `main` app: tiny profile, float16 embeddings) and through the Ray
Data stages give the same masks and selections, the same error rows, one encoder pass per
image, and a rerun picks up where an interrupted job stopped. Parquet output is checked without
Ray: its parts hold the JSONL lines' values, and a resumed job reads their ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from biprompt_client import rle
from biprompt_client.cli import main as cli

from serving.offline import OfflineConfig, run_offline
from tests.integration.conftest import MAX_FLIPPED, png_bytes, scene
from tests.support.parity import assert_masks_close

pytestmark = pytest.mark.integration

SEEDS = (400, 401, 402, 403)


def write_requests(folder: Path) -> Path:
    """12 items over 4 images (a click with text, a click alone, text alone on each), one item
    on a missing file and one click outside its image."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, seed in enumerate(SEEDS):
        (folder / f"img{k}.png").write_bytes(png_bytes(scene(seed)))
        image = f"img{k}.png"
        lines += [
            {"id": f"{k}-both", "image": image, "points": [[40 + 30 * k, 60]],
             "text": "the square" if k % 2 else "the bright rectangle"},
            {"id": f"{k}-point", "image": image, "points": [[200, 100 + 10 * k]],
             "labels": [1], "return_candidates": True},
            {"id": f"{k}-text", "image": image, "text": "the square", "mode": "text"},
        ]
    lines += [{"id": "bad-image", "image": "missing.png", "points": [[5, 5]], "text": "x"},
              {"id": "bad-prompt", "image": "img0.png", "points": [[999, 5]], "text": "x"}]
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def by_id(path: Path) -> dict[str, dict]:
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    out = {str(line["id"]): line for line in lines}
    assert len(out) == len(lines), "an id written twice"
    return out


def small_config() -> OfflineConfig:
    # small shares of the session's 4 CPUs (the apps hold the rest); the served models' thread
    # count, so both sides compute alike
    threads = torch.get_num_threads()
    stage = {"actors": 1, "num_cpus": 0.2, "torch_threads": threads}
    return OfflineConfig(model_profile="configs/models/tiny.yaml", embedding_dtype="float16",
                         encoder={**stage, "batch_size": 2}, points={**stage, "batch_size": 2},
                         text={**stage, "batch_size": 2}, select={"num_cpus": 0.1})


def test_offline_equals_served_and_resumes(main_url, tmp_path):
    reqs = write_requests(tmp_path / "data")
    served_out, out = tmp_path / "served.jsonl", tmp_path / "offline.jsonl"
    assert cli(["--url", main_url, "batch", str(reqs), "--out", str(served_out),
                "--no-progress"]) == 1  # 1: some items failed
    t = time.perf_counter()
    report = run_offline(reqs, out, config=small_config())
    first_s = time.perf_counter() - t
    served, offline = by_id(served_out), by_id(out)
    assert set(offline) == set(served) and len(offline) == 14
    assert (report.ran, report.ok, report.errors, report.skipped) == (14, 12, 2, 0)
    assert report.encoder_images == len(SEEDS)  # counted by the encoder stage itself
    assert report.counts["decoder_prompts"] == 8 and report.counts["text_pairs"] == 6

    for rid, s in served.items():
        o = offline[rid]
        assert o["ok"] == s["ok"], (rid, o, s)
        if not s["ok"]:
            continue
        assert o["image_id"] == s["image_id"]
        # batched differently from the served calls: equal up to pixels rounding across 0
        flipped = assert_masks_close(rle.decode(o["mask"]), rle.decode(s["mask"]), MAX_FLIPPED)
        assert (o["selected"], o["strategy"]) == (s["selected"], s["strategy"]), rid
        for key, tol in (("predicted_iou", 1e-4), ("agreement", 0.05 if flipped else 1e-6)):
            assert (o[key] is None) == (s[key] is None), (rid, key)
            if s[key] is not None:
                assert o[key] == pytest.approx(s[key], abs=tol), (rid, key)
    assert [c["index"] for c in offline["0-point"]["candidates"]] == [0, 1, 2]
    assert all(c["mask"] for c in offline["0-point"]["candidates"])
    assert offline["bad-prompt"]["error"]["type"] == served["bad-prompt"]["error"]["type"] \
        == "invalid_prompt"
    assert offline["bad-image"]["error"]["type"] == "invalid_image"
    assert "missing.png" in offline["bad-image"]["error"]["message"]

    # An interrupted job: 9 whole lines and half of the tenth. Running it again runs only the
    # 5 ids not written whole, and writes what the first run wrote for them.
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:9]) + text[9][:40])
    kept = {json.loads(line)["id"] for line in text[:9]}
    t = time.perf_counter()
    again = run_offline(reqs, out, config=small_config())
    rerun_s = time.perf_counter() - t
    assert (again.skipped, again.ran) == (9, 5)
    rerun = by_id(out)
    assert set(rerun) == set(offline)
    redone = set(offline) - kept
    images = {offline[rid].get("image") for rid in redone if offline[rid]["ok"]}
    assert again.encoder_images == len(images)
    for rid in redone:
        if offline[rid]["ok"]:
            assert rerun[rid]["mask"] == offline[rid]["mask"], rid
        else:
            assert rerun[rid]["error"] == offline[rid]["error"], rid
    print(f"offline: first run {first_s:.1f} s, rerun {rerun_s:.1f} s")


def test_parquet_parts_hold_the_jsonl_lines_and_resume(tmp_path):
    import pyarrow.parquet as pq

    from serving.offline_io import ParquetOut, infer_format

    mask = rle.encode(scene(7)[..., 0] > 30)
    ok = {"id": "a", "ok": True, "image": "/x.png", "image_id": "f" * 64, "width": 320,
          "height": 240, "mode": "biprompt", "mask": mask, "selected": 1, "predicted_iou": 0.9,
          "strategy": "biprompt", "agreement": 0.5, "text_mask": None,
          "candidates": [{"index": i, "predicted_iou": 0.1 * i, "text_iou": None, "mask": None}
                         for i in range(3)]}
    bad = {"id": "b", "ok": False, "image": None, "error": {
        "type": "invalid_prompt", "message": "no", "status_code": 422, "request_id": None}}
    out = tmp_path / "results.parquet"
    assert infer_format(out, None) == "parquet"
    sink = ParquetOut(out, flush_rows=1)
    sink.write([json.dumps(ok), json.dumps(bad)])  # one part, renamed into place whole
    (out / ".tmp-part-cut-short.parquet").write_bytes(b"PAR1")  # a part a kill interrupted
    sink.close()
    again = ParquetOut(out)
    assert again.done == {"a", "b"} and not list(out.glob(".tmp-*"))
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert rle.decode(rows["a"]["mask"]).tolist() == rle.decode(mask).tolist()
    assert rows["a"]["candidates"][2]["predicted_iou"] == pytest.approx(0.2)
    assert rows["b"]["error"]["type"] == "invalid_prompt" and rows["b"]["mask"] is None

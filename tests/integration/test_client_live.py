"""The SDK and the `biprompt` CLI against the real local app (tiny profile, real Redis)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from biprompt_client import AsyncBiPromptClient, BiPromptClient, rle
from biprompt_client.cli import main as cli
from PIL import Image

from biprompt.cache import pack_embedding, unpack_embedding
from tests.integration.conftest import (
    MAX_FLIPPED,
    assert_threads_pinned,
    png_bytes,
    scene,
    stats,
)
from tests.support.gated_proxy import GatedProxy
from tests.support.parity import assert_masks_close

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).with_name("biprompt")


def write_images(folder: Path, seeds) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p = folder / f"img{s}.png"
        p.write_bytes(png_bytes(scene(s)))
        paths.append(p)
    return paths


def test_sdk_segment_equals_in_process_and_reports_cache(main_url, tiny_pipeline, tmp_path):
    (path,) = write_images(tmp_path, [200])
    with BiPromptClient(main_url) as client:
        first = client.segment(path, points=[[120, 90]], text="the red square",
                               return_candidates=True)
        second = client.segment(np.asarray(Image.open(path)), points=[[30, 40]])
    img = np.asarray(Image.open(path))
    assert_threads_pinned("main")  # one code path on both sides: bit for bit
    emb = unpack_embedding(pack_embedding(tiny_pipeline.embed(img), "float16"))
    emb.embedding = emb.embedding.float()
    expected = tiny_pipeline.segment(emb, [[120, 90]], text="the red square")
    assert np.array_equal(first.mask, expected.mask)
    assert first.selected == expected.selected and first.strategy == expected.strategy
    assert not first.cache_hit and second.cache_hit  # array re-encoded to the same PNG bytes
    assert [c.index for c in first.candidates] == [0, 1, 2]


def test_async_sdk_and_segment_many_dedup(main_url, tmp_path):
    paths = write_images(tmp_path, range(210, 214))
    reqs = [{"image": paths[i % 4], "points": [[10 + i, 20]], "text": "the circle"}
            for i in range(24)]

    async def go():
        async with AsyncBiPromptClient(main_url) as client:
            one = await client.segment(paths[0], points=[[5, 5]])
            many = await client.segment_many(reqs, concurrency=6, progress=False)
            return one, many, client.last_batch_stats

    before = stats("main", "ImageEncoder")["images"]
    one, many, st = asyncio.run(go())
    assert one.ok and all(r.ok for r in many) and len(many) == 24
    assert [r.raw["request_id"] for r in many] != []
    assert st["embed_calls"] == 4 and st["ok"] == 24
    assert stats("main", "ImageEncoder")["images"] - before == 4
    # results are in input order: item i was clicked at x = 10 + i on image i % 4
    with BiPromptClient(main_url) as client:
        again = client.segment(paths[5 % 4], points=[[15, 20]], text="the circle")
    assert_masks_close(again.mask, many[5].mask, MAX_FLIPPED)  # alone vs batched with others


def test_cli_segment_writes_mask_and_overlay(main_url, tmp_path, capsys):
    (path,) = write_images(tmp_path, [220])
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = cli(["--url", main_url, "segment", str(path), "--point", "100,80", "--text",
                "the blue square", "--out", str(out), "--overlay", str(overlay), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(out)) > 0
    assert np.array_equal(mask, rle.decode(res["mask"]))
    ov = Image.open(overlay)
    assert ov.size == (320, 240) and ov.mode == "RGB"
    assert not np.array_equal(np.asarray(ov), np.asarray(Image.open(path)))


def test_cli_embed_a_folder(main_url, tmp_path, capsys):
    write_images(tmp_path / "ds", range(230, 233))
    ids = tmp_path / "ids.jsonl"
    assert cli(["--url", main_url, "embed", str(tmp_path / "ds"), "--out", str(ids),
                "--no-progress"]) == 0
    assert "3 encoded, 0 already cached" in capsys.readouterr().err
    assert cli(["--url", main_url, "embed", str(tmp_path / "ds" / "*.png"),
                "--no-progress"]) == 0
    assert "0 encoded, 3 already cached" in capsys.readouterr().err
    assert len(ids.read_text().splitlines()) == 3


def _requests(tmp_path: Path, n: int, n_images: int, seed0: int) -> Path:
    write_images(tmp_path / "imgs", range(seed0, seed0 + n_images))
    lines = [{"id": f"r{i:04d}", "image": f"imgs/img{seed0 + i % n_images}.png",
              "points": [[5 + i % 300, 7 + i % 200]], "text": ["the circle", "the square"][i % 2]}
             for i in range(n)]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_cli_batch_200_over_20_images(main_url, tmp_path, capsys):
    reqs = _requests(tmp_path, 200, 20, 300)
    out = tmp_path / "results.jsonl"
    assert cli(["--url", main_url, "batch", str(reqs), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "200 ok, 0 errors" in err and "20 distinct; encoder misses 20, cache hits 180" in err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == [f"r{i:04d}" for i in range(200)]
    assert all(x["ok"] and x["mask"]["size"] == [240, 320] for x in lines)


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_cli_batch_resumes_after_a_kill(main_url, tmp_path):
    """Killed after exactly 10 results: behind a proxy that passes 10 segment requests and holds
    the 11th, the CLI can neither finish early nor be caught mid-way."""
    reqs = _requests(tmp_path, 120, 6, 400)
    out = tmp_path / "results.jsonl"
    args = ["batch", str(reqs), "--out", str(out), "--concurrency", "1", "--no-progress"]
    with GatedProxy(main_url, route="/v1/segment", allow=10) as proxy:
        proc = subprocess.Popen([str(BIN), "--url", proxy.url, *args],
                                stderr=subprocess.DEVNULL, env={**os.environ})
        try:
            assert proxy.held.wait(120), "the CLI never sent its 11th segment request"
            deadline = time.monotonic() + 60  # the 10th result may still be on its way to disk
            while _lines(out) < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None and _lines(out) == 10
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    partial = len(out.read_text().splitlines())
    assert partial == 10
    with out.open("a") as fh:  # a line cut short by the kill
        fh.write('{"id": "r9999", "ok": tr')
    done = subprocess.run([str(BIN), "--url", main_url, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{120 - partial} to run" in done.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 120

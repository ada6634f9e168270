"""benchmarks/gpu.py without a GPU: it skips cleanly, and its whole code path (encoder variants,
decoder and text rows, the report and its section of BENCHMARKS.md) runs on tiny CPU models."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "B.md"
    assert gpu.main(["--out", str(out), "--json", str(tmp_path / "g.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_the_code_path_runs_on_tiny_models_and_its_section_is_replaced_not_repeated(tmp_path):
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "gpu.json"
    out.write_text("# Benchmarks\n\nthe CPU tables\n")
    argv = ["--device", "cpu", "--profile", "configs/models/tiny.yaml", "--runs", "1",
            "--no-served", "--root", str(tmp_path / "root"), "--out", str(out), "--json", str(js)]
    assert gpu.main(argv) == 0
    res = json.loads(js.read_text())
    assert {(r["dtype"], r["variant"]) for r in res["encoder"]} == {
        (d, v) for d in gpu.DTYPES for v in gpu.VARIANTS}
    assert all(r["median_ms"] > 0 for r in res["encoder"])
    assert [r["prompts"] for r in res["engines"]["decoder"]] == list(gpu.DECODER_PROMPTS)
    assert [r["batch"] for r in res["engines"]["text"]] == list(gpu.TEXT_BATCHES)
    assert res["default_variant"] == "fast, blocked bias"  # the CPU keeps cache-sized blocks
    assert gpu.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nthe CPU tables\n")
    assert text.count(gpu.BEGIN) == 1 and text.count(gpu.END) == 1
    # make bench rewrites the file from its own tables and carries this section over
    kept = gpu.kept_section(text)
    assert gpu.splice("# Benchmarks\n\nnew CPU tables\n", kept).count("## GPU") == 1


def test_the_fast_path_decision_takes_the_faster_variant():
    rows = [{"dtype": "float16", "variant": v, "median_ms": ms}
            for v, ms in zip(gpu.VARIANTS, (30.0, 12.0, 10.0), strict=True)]
    d = gpu.fast_path_decision(rows)["float16"]
    assert d["faster"] == "fast, whole bias"
    assert d["ratio_vs_other"] == pytest.approx(1.2) and d["speedup_vs_reference"] == 3.0
    assert gpu.default_variant(torch.device("meta")) == "fast, whole bias"

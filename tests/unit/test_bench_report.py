"""BENCHMARKS.md rendering: targets are judged from the numbers, rows come from the results."""

from __future__ import annotations

import copy

import pytest

from benchmarks.report import TARGETS, ratios, render
from benchmarks.stats import summary


def _row(latency, model, passes=0, hits=1.0):
    return {"latency_ms": summary(latency), "overhead_ms": summary(
        [a - b for a, b in zip(latency, model, strict=True)]), "model_ms": summary(model),
        "throughput_rps": 1000 / max(latency), "seconds": sum(latency) / 1000,
        "encoder_passes": passes, "cache_hit_rate": hits}


def _served(cold, warm, overhead, many_passes):
    rows = {key: _row([warm + overhead] * 3, [warm] * 3) for key in
            ("warm", "concurrency_1", "concurrency_4", "concurrency_8")}
    rows["cold"] = _row([cold] * 3, [cold - overhead] * 3, passes=3, hits=0.0)
    rows["session"] = {**_row([warm] * 19, [warm - 5] * 19, passes=1), "first_click_ms": cold,
                       "session_s": 1.0, "clicks": 20}
    for how in ("sdk", "batch"):
        rows[f"many_{how}"] = {"requests": 200, "ok": 200, "seconds": 5.0, "throughput_rps": 40.0,
                               "encoder_passes": many_passes, "cache_hit_rate": 0.9}
    rows.update(startup_s=9.0, torch_threads={"ImageEncoder": 2}, direct_url=None)
    return rows


@pytest.fixture
def results():
    enc_stats = {"n": 2, "median": 3.6, "p95": 3.7, "min": 3.5, "max": 3.7, "runs": [3.5, 3.7]}
    ref_stats = {**enc_stats, "median": 9.0, "p95": 9.0, "min": 9.0, "max": 9.0}
    naive_stages = {k: 1.0 for k in ("sam_set_image", "sam_predict", "evf_encoder", "evf_text",
                                     "select", "total")}
    return {
        "mode": "quick", "seed": 7, "cache": "in-process LRU", "seconds": 200.0,
        "machine": {"date": "2026-11-22 00:00 UTC", "commit": "abc1234", "cpu": "Xeon",
                    "cores": 2, "torch_threads": 2, "simd": ["avx2"], "l2": "4 MiB",
                    "l3": "32 MiB", "memory_gib": 24.0, "versions": {"torch": "2.13.0"}},
        "encoder": {"gemm_before": {"n": 4096, "best_gflops": 400.0, "median_gflops": 390.0},
                    "gemm_after": {"n": 4096, "best_gflops": 401.0, "median_gflops": 391.0},
                    "gemm_gflops": 401.0, "limit_s": 2.4, "flops": 972e9,
                    "flops_fast_path": 942e9, "reference_s": ref_stats, "fast_s": enc_stats,
                    "fast_over_limit": 3.6 / 2.4, "speedup": 2.5, "max_abs_diff": 1e-5},
        "naive": {"vitb": {"latency_ms": summary([18000.0]), "stages_ms": naive_stages,
                           "requests": 1},
                  "demo": {"latency_ms": summary([30.0] * 3), "stages_ms": naive_stages,
                           "requests": 3}},
        "served": {"demo": _served(80.0, 20.0, 12.0, 20),
                   "vitb": _served(5000.0, 200.0, 40.0, 20)},
    }


def test_ratios_and_targets_come_from_the_numbers(results):
    r = ratios(results)
    assert r["cold_vs_naive"] == pytest.approx(5000 / 18000)
    assert r["warm_vs_cold"] == pytest.approx(240 / 5000)
    assert r["overhead_ms"] == pytest.approx(12.0)
    assert r["encoder_vs_limit"] == pytest.approx(1.5)
    text = render(results)
    for line in text.splitlines():
        if line.startswith("| cold BiPrompt request / naive"):
            assert "0.278x" in line and line.endswith("| yes |")
        if line.startswith("| serving overhead p50"):
            assert "12.0 ms" in line and line.endswith("| yes |")
    assert "| reference (segment-anything) | 9.00 |" in text
    assert "demo sdk: 20, demo batch: 20, vitb sdk: 20, vitb batch: 20" in text


def test_a_missed_target_says_no(results):
    worse = copy.deepcopy(results)
    worse["served"]["demo"] = _served(80.0, 20.0, TARGETS["overhead_ms"] + 5, 21)
    text = render(worse)
    overhead = next(x for x in text.splitlines() if x.startswith("| serving overhead p50"))
    passes = next(x for x in text.splitlines() if x.startswith("| 200 requests over 20"))
    assert overhead.endswith("| **no** |") and "20.0 ms" in overhead
    assert passes.endswith("| **no** |") and "demo sdk: 21" in passes


def test_new_text_prompts_never_repeat_an_expression_on_an_image():
    from benchmarks.serving import Scenes

    scenes = Scenes(3)
    scene, _ = scenes.image()
    used: set[str] = set()
    texts = []
    while (p := scenes.new_text_prompt(scene, used)) is not None:
        texts.append(p["text"])
        x, y = p["points"][0]
        assert 0 <= x < 256 and 0 <= y < 256
    assert len(texts) == len(set(texts)) == len(used) >= 2
    assert used == set(scene.expressions)


def test_the_overhead_is_split_by_part_and_reported(results):
    from benchmarks.serving import breakdown_ms

    t = {"total": 15.0, "cache": 0.5, "point_decoder": 2.0, "text_model": 1.0,
         "models_wait": 6.0, "selector": 1.0, "selector_wait": 4.0}
    parts = breakdown_ms(24.0, t)
    assert parts == pytest.approx({"http_proxy": 9.0, "ingress": 4.5, "cache": 0.5,
                                   "model_hops": 4.0, "selector_hop": 3.0})
    results["served"]["demo"]["concurrency_1"]["overhead_parts_ms"] = parts
    assert "Overhead through the proxy, by part (medians, ms): http proxy 9.0" in render(results)

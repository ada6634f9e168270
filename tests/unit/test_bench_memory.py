"""The per-replica memory benchmark: its BENCHMARKS.md section judges every target from the
numbers (a missed one says no), and the helpers that read a process need no Ray."""

from __future__ import annotations

import copy

import pytest

from benchmarks.memory import PARTS, pipeline_weights, proc_status_mb, request_inputs
from benchmarks.report import MEMORY_BASELINE_MB, TARGETS, memory_section

MB = 2**20
SAM_ENCODER = {"sam.image_encoder": 342 * MB}
SAM_DECODER = {"sam.prompt_encoder": 25_000, "sam.mask_decoder": 16 * MB}
EVF = {"evf.beit3": 843 * MB, "evf.text_hidden_fcs": 3 * MB, "evf.prompt_encoder": 25_000,
       "evf.mask_decoder": 16 * MB}


def _replica(deployment: str, pid: int, peak: float, weights: dict | None) -> dict:
    return {"deployment": deployment, "pid": pid, "vmhwm_mb": peak, "vmrss_mb": peak - 20,
            "rssanon_mb": peak - 60, "rssfile_mb": 40.0, "ready_s": 6.5, "constructor_s": 2.0, "weights": weights, "source": "stats"}


@pytest.fixture
def mem():
    return {
        "scale": "vit_b", "image_size": [480, 640], "startup_s": 12.0, "request_ms": 5200.0,
        "whole_pipeline": {"pid": 9, "vmhwm_mb": 1600.0, "vmrss_mb": 1500.0, "ready_s": 8.0,
                           "request_ms": 4100.0, "weights": {**SAM_ENCODER, **SAM_DECODER, **EVF},
                           "cuda_max_allocated_mb": None},
        "replicas": [
            _replica("Ingress", 15, 339.0, {}),
            _replica("ImageEncoder", 11, 720.0, dict(SAM_ENCODER)),
            _replica("PointDecoder", 12, 380.0, dict(SAM_DECODER)),
            _replica("TextMask", 13, 1300.0, dict(EVF)),
            _replica("Selector", 14, 326.0, {}),
        ],
    }


def _lines(mem: dict) -> list[str]:
    return memory_section(mem)


def _target(lines: list[str], start: str) -> str:
    return next(x for x in lines if x.startswith(f"| {start}"))


def test_every_replica_the_whole_pipeline_and_the_baseline_are_in_the_table(mem):
    lines = _lines(mem)
    assert lines[0] == "## Per-replica memory (vit_b scale)"
    rows = [x for x in lines if x.startswith("| ") and " | " in x]
    names = [x.split(" | ")[0][2:] for x in rows]
    # deployments in pipeline order, then the one process holding everything
    assert names[1:7] == ["ImageEncoder", "PointDecoder", "TextMask", "Selector", "Ingress",
                          "whole pipeline (one process)"]
    decoder = _target(lines, "PointDecoder |")
    assert "| 12 | 380 | 360 | 320 / 40 | 6.5 |" in decoder
    assert "sam.prompt_encoder 0.02, sam.mask_decoder 16 (16 in all)" in decoder
    assert decoder.endswith(f"| {MEMORY_BASELINE_MB['PointDecoder']:,} |")
    assert "| none |" in _target(lines, "Selector |")
    whole = _target(lines, "whole pipeline")
    assert "| 1,600 | 1,500 | - | 8.0 |" in whole and "evf.beit3 843" in whole
    assert whole.endswith(f"| {MEMORY_BASELINE_MB['whole pipeline']:,} |")
    assert not any("CUDA" in x for x in lines)  # no CUDA numbers: no column


def test_targets_met_say_yes(mem):
    lines = _lines(mem)
    ratio = _target(lines, "PointDecoder replica peak RSS")
    assert "0.237x (380 / 1,600 MB)" in ratio and f"<= {TARGETS['pointdecoder_vs_whole']}x" in ratio
    for start in ("PointDecoder replica peak RSS", "TextMask replica holds",
                  "ImageEncoder replica holds", "Selector and Ingress"):
        assert _target(lines, start).endswith("| yes |"), start
    assert "holds sam.image_encoder |" in _target(lines, "ImageEncoder replica holds")


def test_a_missed_target_says_no(mem):
    worse = copy.deepcopy(mem)
    reps = {x["deployment"]: x for x in worse["replicas"]}
    reps["PointDecoder"]["vmhwm_mb"] = 0.4 * 1600.0  # over 0.35x the whole pipeline's peak
    reps["TextMask"]["weights"].update(SAM_ENCODER)
    reps["ImageEncoder"]["weights"]["evf.beit3"] = 843 * MB
    reps["Ingress"]["weights"] = {"sam.mask_decoder": 16 * MB}
    lines = _lines(worse)
    ratio = _target(lines, "PointDecoder replica peak RSS")
    assert "0.400x" in ratio and ratio.endswith("| **no** |")
    text = _target(lines, "TextMask replica holds")
    assert "holds sam.image_encoder (342 MB)" in text and text.endswith("| **no** |")
    assert _target(lines, "ImageEncoder replica holds").endswith("| **no** |")
    light = _target(lines, "Selector and Ingress")
    assert "Ingress: sam.mask_decoder 16" in light and light.endswith("| **no** |")


def test_a_target_without_evidence_is_not_met(mem):
    unknown = copy.deepcopy(mem)
    for x in unknown["replicas"]:
        if x["deployment"] in ("TextMask", "Selector"):
            x.update(weights=None, ready_s=None, source="proc")
    lines = _lines(unknown)
    text = _target(lines, "TextMask replica holds")
    assert "no weights report" in text and text.endswith("| **no** |")
    assert _target(lines, "Selector and Ingress").endswith("| **no** |")
    assert "| not reported |" in _target(lines, "TextMask |")
    assert "except Selector, TextMask: /proc/<pid>/status" in "\n".join(lines)  # says where from
    # the others still stand on their own numbers
    assert _target(lines, "ImageEncoder replica holds").endswith("| yes |")


def test_the_baseline_column_is_for_its_own_scale_only(mem):
    demo = {**mem, "scale": "demo"}
    lines = _lines(demo)
    assert lines[0] == "## Per-replica memory (demo scale)"
    assert not any("before" in x for x in lines if x.startswith("| process"))
    assert _target(lines, "PointDecoder |").endswith("(16 in all) |")


def test_cuda_numbers_get_a_column(mem):
    gpu = copy.deepcopy(mem)
    for x in gpu["replicas"]:
        x["cuda_max_allocated_mb"] = 10.0
    gpu["whole_pipeline"]["cuda_max_allocated_mb"] = 1250.0
    lines = _lines(gpu)
    assert any("CUDA max allocated MB" in x for x in lines)
    assert "| 1,250 |" in _target(lines, "whole pipeline")


def test_proc_status_reads_this_process():
    me = proc_status_mb()
    assert me["vmhwm_mb"] >= me["vmrss_mb"] > 10
    assert me["rssanon_mb"] + me["rssfile_mb"] <= me["vmrss_mb"] + 1
    assert set(proc_status_mb(2**30).values()) == {None}  # no such process


def test_the_one_request_is_the_same_in_every_process():
    a, b = request_inputs(5), request_inputs(5)
    assert a["png"] == b["png"] and a["points"] == b["points"] and a["text"] == b["text"]
    (x, y), = a["points"]
    assert a["rgb"].shape == (480, 640, 3) and 0 <= x < 640 and 0 <= y < 480
    assert request_inputs(6)["png"] != a["png"]


def test_evf_s_own_image_encoder_counts_as_sam_s(mem):
    copy_held = copy.deepcopy(mem)
    next(x for x in copy_held["replicas"] if x["deployment"] == "TextMask")["weights"][
        "evf.image_encoder"] = 342 * MB
    text = _target(_lines(copy_held), "TextMask replica holds")
    assert "holds evf.image_encoder (342 MB)" in text and text.endswith("| **no** |")


def test_pipeline_weights_name_the_parts(tiny_pipeline):
    w = pipeline_weights(tiny_pipeline)
    held = {k for k, v in w.items() if v}
    assert held <= set(PARTS)
    assert {"sam.image_encoder", "sam.mask_decoder", "evf.beit3"} <= held
    assert all(v >= 0 for v in w.values())

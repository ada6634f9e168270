"""The bundled demo model (models/demo, configs/models/demo.yaml): it loads through the official
layouts' code paths, fits the size budget, and segments ShapesRef well. Floors, not timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biprompt.evaluate import evaluate_shapes
from biprompt.pipeline import BiPromptPipeline

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "configs/models/demo.yaml"


@pytest.fixture(scope="module")
def demo_pipeline():
    return BiPromptPipeline.from_config(PROFILE)


def test_checkpoints_are_small_and_in_the_official_layouts():
    root = REPO / "models/demo"
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in
             (".pth", ".safetensors", ".model", ".json") and "train_" not in p.name]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    assert (root / "sam_demo.pth").is_file()
    assert {"config.json", "model.safetensors", "sentencepiece.bpe.model"} <= {
        p.name for p in (root / "evf_demo").iterdir()}


def test_model_ids_name_the_demo_files(demo_pipeline):
    ids = demo_pipeline.model_ids
    assert "sam_demo" in ids["sam"] and "evf_demo" in ids["text"]
    assert demo_pipeline.spec.name == "demo"


def test_the_shipped_sam_ends_with_the_recipes_second_refinement_pass(demo_pipeline):
    """make train-demo's last stage (the pass weighted to 320x240) is what the shipped SAM last
    went through, and the profile serves the rule chosen for that SAM: the arbiter, fit for the
    experts it serves beside."""
    passes = json.loads((REPO / "models/demo/refine_summary.json").read_text())
    last = passes[-1]["args"]
    assert last["full"] and (last["steps"], last["seed"]) == (600, 20261203)
    assert last["canvas_weights"] == "0.2,0.6,0.1,0.1"
    assert demo_pipeline.rule == "arbiter"
    assert demo_pipeline.arbiter.mismatches(demo_pipeline.model_ids) == []


def test_accuracy_floor_on_a_seeded_set(demo_pipeline):
    r = evaluate_shapes(demo_pipeline, n=80, seed=4242)
    m = {name: v["all"]["miou"] for name, v in r["methods"].items()}
    assert m["BiPrompt"] >= 0.80, m
    assert m["oracle"] >= m["BiPrompt"] >= m["point-only"] - 0.02, m
    amb = {name: v["ambiguous"]["miou"] for name, v in r["methods"].items()}
    assert r["n_ambiguous"] >= 5
    assert amb["BiPrompt"] > amb["point-only"], amb


def test_the_reference_expert_loads_and_votes_well(demo_pipeline):
    """vrp_demo/ (biprompt/train/reference.py) in its documented layout, paired with this SAM;
    on reference episodes it lifts the point alone (the issue's bar is +0.04 at n=500)."""
    ids = demo_pipeline.model_ids
    assert ids["reference"].startswith("vrp-demo:vrp_demo:")
    assert {p.name for p in (REPO / "models/demo/vrp_demo").iterdir()} == {
        "config.json", "model.safetensors"}
    r = evaluate_shapes(demo_pipeline, n=80, seed=4243)
    m = {name: v["all"]["miou"] for name, v in r["methods"].items()}
    assert m["point+reference"] >= m["point-only"] + 0.04, m
    assert m["oracle"] >= m["point+reference"], m
    assert m["oracle"] >= m["point+text+reference (arbiter)"], m  # the served rule's row
    assert m["reference-only"] >= 0.55, m

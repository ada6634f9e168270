"""Full-size models built on the meta device have exactly the official keys and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from biprompt.models.checkpoint import check_keys, expected_shapes
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.sam import build_sam, get_sam_spec, infer_sam_spec, match_variant

# Copies of shared/reference/keys/*.json: every key and shape of the official checkpoints.
KEYS = Path(__file__).resolve().parents[1] / "data" / "keys"


def manifest(name: str) -> dict:
    return json.loads((KEYS / f"{name}.json").read_text())


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_sam_keys_and_shapes(variant):
    expected = manifest(f"sam_{variant}")
    with torch.device("meta"):
        model = build_sam(get_sam_spec(variant))
    got = expected_shapes(model)
    assert got == {k: tuple(v) for k, v in expected.items()}
    fake = {k: torch.empty(v, device="meta") for k, v in expected.items()}
    assert match_variant(infer_sam_spec(fake)).name == variant


def test_evf_sam_keys_and_shapes():
    expected = manifest("evf_sam")
    with torch.device("meta"):
        model = EvfSam(EvfConfig())  # config.json defaults of YxZhang/evf-sam
    assert expected_shapes(model) == {k: tuple(v) for k, v in expected.items()}
    check_keys(expected, model.state_dict(), "evf_sam manifest")
    n = sum(v.numel() for v in model.state_dict().values())
    assert abs(n - 1.315e9) < 0.01e9


def test_evf_visual_model_is_sam_vit_h_with_prefix():
    evf = manifest("evf_sam")
    sam = manifest("sam_vit_h")
    visual = {k.removeprefix("visual_model."): v for k, v in evf.items()
              if k.startswith("visual_model.")}
    assert visual == sam

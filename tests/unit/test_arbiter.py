"""The selection arbiter (biprompt/arbiter.py): its features, its choice, its file, the profile
that serves it, and its fitting (biprompt/train/arbiter.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from biprompt.arbiter import FEATURES, FORMAT, Arbiter, features, own_pick
from biprompt.errors import ModelConfigError
from biprompt.profile import ModelProfile
from biprompt.selection import mask_ious, select
from biprompt.train import arbiter as fitting

REPO = Path(__file__).resolve().parents[2]
N = len(FEATURES)


def boxes(spec, shape=(20, 20)):
    out = np.zeros((len(spec), *shape), dtype=bool)
    for i, (y0, y1, x0, x1) in enumerate(spec):
        out[i, y0:y1, x0:x1] = True
    return out


CANDS = boxes([(8, 12, 8, 12), (5, 15, 5, 15), (0, 20, 0, 20)])  # part / object / whole
SCORES = np.array([0.9, 0.5, 0.3])
TEXT = boxes([(0, 20, 0, 14)])[0]  # the whole, loosely
REFERENCE = boxes([(5, 15, 4, 15)])[0]  # the object


def constant(bias: float, **weights: float) -> Arbiter:
    w = [weights.get(name, 0.0) for name in FEATURES]
    return Arbiter(("text", "reference"), (0.0,) * N, (1.0,) * N, tuple(w), bias)


def test_features_describe_both_picks():
    t, r = mask_ious(CANDS, TEXT), mask_ious(CANDS, REFERENCE)
    areas = CANDS.reshape(3, -1).mean(axis=1)
    f, a, b = features(t, r, SCORES, areas, 0.25)
    assert (a, b) == (2, 1)
    got = dict(zip(FEATURES, f, strict=True))
    assert got["first_iou_a"] == pytest.approx(t[2]) and got["second_iou_b"] == pytest.approx(r[1])
    assert got["first_iou_b"] == pytest.approx(t[1]) and got["second_iou_a"] == pytest.approx(r[2])
    assert (got["score_a"], got["score_b"]) == (0.3, 0.5)
    assert got["log_area_a"] == pytest.approx(np.log(1.0 + 1e-4))
    assert got["expert_agreement"] == 0.25
    assert got["first_margin"] == pytest.approx(t[2] - t[1])
    assert (got["a_before_b"], got["a_is_whole"], got["b_is_part"], got["b_is_whole"]) == (
        0.0, 1.0, 0.0, 0.0)
    # ties go as in the paper's rule: higher predicted IoU, then the lower index
    assert own_pick(np.array([0.5, 0.5, 0.1]), np.array([0.2, 0.4, 0.9])) == 1
    assert own_pick(np.array([0.5, 0.5, 0.1]), np.array([0.4, 0.4, 0.9])) == 0


@pytest.mark.parametrize("bias, expected, lead", [(1.0, 2, "text"), (-1.0, 1, "reference")])
def test_the_arbiter_takes_one_experts_pick_where_they_differ(bias, expected, lead):
    experts = {"text": TEXT, "reference": REFERENCE}
    sel = select(CANDS, SCORES, experts, rule="arbiter", arbiter=constant(bias))
    assert (sel.selected, sel.strategy) == (expected, "biprompt")
    support = max(float(mask_ious(CANDS, m)[expected]) for m in experts.values())
    assert sel.agreement == pytest.approx(support)  # the most any expert overlaps the answer
    assert mask_ious(CANDS, experts[lead]).argmax() == expected  # the lead expert's own pick
    assert sel.expert_agreement == pytest.approx(float(mask_ious(TEXT[None], REFERENCE)[0]))


def test_where_the_experts_agree_the_arbiter_has_no_say():
    experts = {"text": REFERENCE, "reference": REFERENCE}
    for bias in (5.0, -5.0):
        assert select(CANDS, SCORES, experts, rule="arbiter",
                      arbiter=constant(bias)).selected == 1


def test_other_experts_than_its_own_fall_back_to_the_rules_it_refines():
    arb = constant(-1.0)
    # one expert: the paper's rule
    assert select(CANDS, SCORES, {"reference": REFERENCE}, rule="arbiter", arbiter=arb).selected == 1
    assert select(CANDS, SCORES, TEXT, rule="arbiter", arbiter=arb).selected == 2
    # an empty reference abstains: the text alone decides
    empty = np.zeros_like(TEXT)
    assert select(CANDS, SCORES, {"text": TEXT, "reference": empty}, rule="arbiter",
                  arbiter=arb).selected == 2
    # experts it was not fit for: confident
    other = {"text": TEXT, "sketch": REFERENCE}
    assert (select(CANDS, SCORES, other, rule="arbiter", arbiter=arb).selected
            == select(CANDS, SCORES, other, rule="confident").selected)
    with pytest.raises(ValueError, match="needs an arbiter"):
        select(CANDS, SCORES, {"text": TEXT, "reference": REFERENCE}, rule="arbiter")


def test_the_file_round_trips_and_refuses_what_it_cannot_read(tmp_path):
    arb = dataclasses.replace(constant(0.5, first_iou_a=2.0), models={"text": "evf:x"},
                              fit={"seed": 1})
    path = arb.save(tmp_path / "arbiter.json")
    back = Arbiter.load(path)
    assert (back.weights, back.bias, back.models, back.fit) == (arb.weights, 0.5,
                                                                {"text": "evf:x"}, {"seed": 1})
    assert back.path == str(path)
    d = json.loads(path.read_text())
    for bad, match in [({**d, "format": "other/1"}, "not a biprompt-arbiter/1"),
                       ({**d, "features": d["features"][:-1]}, "fit it again"),
                       ({**d, "weights": d["weights"][:-1]}, "weights"),
                       ({**d, "experts": ["text", "text"]}, "two experts"),
                       ({k: v for k, v in d.items() if k != "bias"}, "malformed")]:
        with pytest.raises(ModelConfigError, match=match):
            Arbiter.from_dict(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ModelConfigError, match="could not read"):
        Arbiter.load(tmp_path / "broken.json")
    assert arb.mismatches({"text": "evf:x"}) == [] and arb.mismatches({"text": "evf:y"}) == ["text"]


def test_a_profile_names_its_arbiter_relative_to_itself(tmp_path):
    constant(0.0).save(tmp_path / "arb.json")
    (tmp_path / "p.yaml").write_text("selection:\n  rule: arbiter\n  arbiter: ./arb.json\n")
    p = ModelProfile.load(tmp_path / "p.yaml")
    assert p.selection_rule == "arbiter" and p.selection_arbiter.path == str(tmp_path / "arb.json")
    with pytest.raises(ModelConfigError, match="names no selection.arbiter"):
        ModelProfile.from_dict({"selection": {"rule": "arbiter"}})
    with pytest.raises(ModelConfigError, match="could not read the arbiter"):
        ModelProfile.from_dict({"selection": {"arbiter": str(tmp_path / "none.json")}})
    with pytest.raises(ModelConfigError, match="use mean, confident or arbiter"):
        ModelProfile.from_dict({"selection": {"rule": "vote"}})


def test_fitting_learns_which_pick_to_take():
    """Synthetic disagreements: the first pick is right exactly when its SAM score beats the
    second's. The fit finds it, and takes the better pick nearly always."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(600, N))
    gain = np.where(f[:, FEATURES.index("score_a")] > f[:, FEATURES.index("score_b")], 0.3, -0.3)
    mean, std, w, bias = fitting.fit(f, gain, steps=800)
    arb = Arbiter(("text", "reference"), tuple(mean), tuple(std), tuple(w), bias)
    took_first = np.array([arb.prefers_first(x) for x in f])
    assert ((gain > 0) == took_first).mean() >= 0.95
    assert w[FEATURES.index("score_a")] > 0 > w[FEATURES.index("score_b")]


def test_the_fitting_stage_runs_on_the_demo_layout(tmp_path):
    """biprompt.train.arbiter (make train-demo's last stage), smoke-sized, on the shipped model:
    the file it writes loads, names the experts it was fit for, and says how it was fit."""
    out = tmp_path / "arbiter.json"
    summary = fitting.main(["--model", str(REPO / "models/demo"), "--out", str(out), "--n", "16",
                            "--sizes", "256x256", "--steps", "20"])
    arb = Arbiter.load(out)
    assert arb.experts == ("text", "reference")
    assert arb.models["reference"].startswith("vrp-demo:vrp_demo:")
    assert (arb.fit["samples"], arb.fit["seed"], summary["out"]) == (16, 20261204, str(out))
    assert arb.fit["picks_differ"] >= 2
    fit = arb.fit["miou_on_fit_data"]
    assert fit["oracle"] >= fit["better_of_the_two"] >= max(fit["text"], fit["reference"])
    with pytest.raises(SystemExit):
        fitting.parse_args(["--model", "m", "--sizes", "256"])
    with pytest.raises(SystemExit, match="too few to fit"):  # one sample: nothing to learn from
        fitting.main(["--model", str(REPO / "models/demo"), "--out", str(out), "--n", "1",
                      "--sizes", "256x256"])


def test_the_shipped_arbiter_was_fit_by_the_recipe_for_the_shipped_experts():
    p = ModelProfile.load(REPO / "configs/models/demo.yaml")
    arb = p.selection_arbiter
    assert p.selection_rule == "arbiter" and Path(arb.path) == REPO / "models/demo/arbiter.json"
    assert json.loads((REPO / "models/demo/arbiter.json").read_text())["format"] == FORMAT
    assert (arb.fit["seed"], arb.fit["n_per_size"], arb.fit["generator"]) == (20261204, 1000, "a")
    assert arb.fit["seed"] not in (777, 778, 12345)  # neither tuning nor reported seeds
    fit = arb.fit["miou_on_fit_data"]
    assert fit["arbiter"] > fit["confident"]

"""biprompt.evaluate on the tiny profile (random weights: structure and invariants, not accuracy)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from biprompt.data.shapes_ref import make_samples
from biprompt.evaluate import (
    BIPROMPT,
    METHODS,
    ORACLE,
    POINT,
    SERVED,
    TEXT,
    best_candidate,
    evaluate_shapes,
    format_table,
    main,
    method_masks,
    parse_size,
    reference_methods,
    summarize,
)
from biprompt.metrics import Scores

N, SEED = 10, 2  # seed 2: 4 of the first 10 samples are ambiguous
TINY = "configs/models/tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models are too small to gain from threads; on a busy box they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result(tiny_pipeline):
    return evaluate_shapes(tiny_pipeline, n=N, seed=SEED, reference=False)


def test_structure(result, tiny_pipeline):
    assert {"n", "seed", "height", "width", "n_ambiguous", "model", "methods", "seconds",
            "strategies"} <= set(result)
    assert (result["n"], result["seed"], result["height"], result["width"]) == (N, SEED, 256, 256)
    assert result["model"] == tiny_pipeline.model_ids
    assert set(result["methods"]) == set(METHODS)
    for subsets in result["methods"].values():
        assert set(subsets) == {"all", "ambiguous"}
        for scores in subsets.values():
            assert set(scores) == {"miou", "ciou", "mdice"}
    assert sum(result["strategies"].values()) == N
    json.loads(json.dumps(result, allow_nan=False))


def test_scores_in_range_and_oracle_is_the_ceiling(result):
    m = result["methods"]
    for name in METHODS:
        for subset in ("all", "ambiguous"):
            for key in ("miou", "ciou", "mdice"):
                assert 0.0 <= m[name][subset][key] <= 1.0, (name, subset, key)
    for subset in ("all", "ambiguous"):
        oracle = m[ORACLE][subset]["miou"]
        for name in (POINT, BIPROMPT, SERVED):  # text-only is no candidate: no bound
            assert oracle >= m[name][subset]["miou"] - 1e-12, (name, subset)


def test_n_ambiguous(result):
    expected = sum(s.ambiguous for s in make_samples(N, SEED))
    assert expected > 0
    assert result["n_ambiguous"] == expected


def test_deterministic(result, tiny_pipeline):
    again = evaluate_shapes(tiny_pipeline, n=N, seed=SEED, reference=False)
    a, b = dict(result), dict(again)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_method_masks_follow_the_rules(tiny_pipeline):
    for s in make_samples(4, SEED):
        res = tiny_pipeline.segment(tiny_pipeline.embed(s.image), [list(s.point_index)],
                                    text=s.expression, mode="biprompt")
        masks = method_masks(res, s.gt_mask)
        assert set(masks) == set(METHODS)
        scores = np.asarray(res.candidate_scores)
        assert np.array_equal(masks[POINT], res.candidates[int(np.argmax(scores))])
        assert masks[TEXT] is res.text_mask
        assert masks[SERVED] is res.mask
        if res.strategy == "biprompt":  # no fallback: the served mask is the spec rule's
            assert np.array_equal(masks[BIPROMPT], masks[SERVED])


def test_best_candidate_ties():
    ref = np.zeros((4, 4), dtype=bool)
    ref[:2, :2] = True
    cands = np.zeros((3, 4, 4), dtype=bool)
    cands[0, :2, :2] = True  # IoU 1
    cands[1, :2, :2] = True  # IoU 1, higher predicted IoU
    cands[2, :1, :1] = True
    assert best_candidate(cands, np.array([0.5, 0.9, 0.99]), ref) == 1
    assert best_candidate(cands, np.array([0.5, 0.5, 0.99]), ref) == 0  # full tie: lower index


def test_ciou_by_hand():
    def mask(rows, cols):
        m = np.zeros((8, 8), dtype=bool)
        m[rows, cols] = True
        return m

    pairs = [
        (mask(slice(0, 2), slice(0, 2)), mask(slice(0, 2), slice(0, 4))),  # I 4, U 8
        (mask(slice(0, 4), slice(0, 4)), mask(slice(0, 4), slice(0, 4))),  # I 16, U 16
        (mask(slice(0, 1), slice(0, 2)), mask(slice(4, 5), slice(0, 2))),  # I 0, U 4
    ]
    scores = Scores()
    for p, g in pairs:
        scores.add(p, g)
    out = summarize(scores)
    assert out["ciou"] == pytest.approx(20 / 28)
    assert out["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["mdice"] == pytest.approx((8 / 12 + 1.0 + 0.0) / 3)
    assert summarize(Scores()) == {"miou": None, "ciou": None, "mdice": None}


def test_format_table(result):
    table = format_table(result)
    for name in METHODS:
        assert f"| {name} |" in table
    assert f"n={N}" in table and f"seed={SEED}" in table
    assert f"ambiguous={result['n_ambiguous']}" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(METHODS)
    empty = {**result, "methods": {k: {**v, "ambiguous": summarize(Scores())}
                                   for k, v in result["methods"].items()}}
    assert "| - |" in format_table(empty)


def test_parse_size():
    assert parse_size("320x240") == (320, 240)  # width, height
    for bad in ("320", "ax240", "0x10"):
        with pytest.raises(Exception, match="--size"):
            parse_size(bad)


def test_main_writes_json(tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = main(["shapes", "--n", "3", "--seed", "1", "--profile", TINY, "--size", "320x240",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert (data["n"], data["seed"], data["width"], data["height"]) == (3, 1, 320, 240)
    assert set(data["methods"]) == set(METHODS) | set(reference_methods())
    assert "| oracle |" in capsys.readouterr().out


def test_main_missing_profile(tmp_path, capsys):
    assert main(["shapes", "--n", "1", "--profile", str(tmp_path / "nope.yaml")]) == 2
    assert "no model profile" in capsys.readouterr().err


def test_cli_eval():
    """`biprompt eval` runs python -m biprompt.evaluate in a child: the table comes out, the exit
    status comes back, and the CLI's own process never loads the core or torch."""
    code = ("import sys; from biprompt_client.cli import main; rc = main(sys.argv[1:]); "
            "assert not {'biprompt', 'torch'} & set(sys.modules); sys.exit(rc)")
    args = ["eval", "shapes", "--n", "6", "--seed", "3", "--profile", TINY, "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "n=6 seed=3" in proc.stdout
    for name in METHODS:
        assert f"| {name} |" in proc.stdout


def test_cli_eval_usage_and_exit_status(capfd):
    from biprompt_client.cli import main as cli_main

    assert cli_main(["eval", "--help"]) == 0
    assert "usage: biprompt eval" in capfd.readouterr().out
    assert cli_main(["eval", "shapes", "--n", "many"]) == 2  # argparse's status, from the child
    assert "biprompt eval shapes: error: argument --n" in capfd.readouterr().err


def test_cli_eval_without_server_package(monkeypatch, capsys):
    from biprompt_client.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "biprompt", None)  # find_spec("biprompt") -> None
    assert cli_main(["eval", "shapes", "--n", "1"]) == 2
    assert "needs the full biprompt-serve install" in capsys.readouterr().err


def test_client_cli_does_not_import_torch():
    code = ("import sys, biprompt_client.cli; "
            "sys.exit(int('torch' in sys.modules or 'biprompt' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_nan_free(result):
    for subsets in result["methods"].values():
        for scores in subsets.values():
            assert all(v is not None and not math.isnan(v) for v in scores.values())


def test_the_second_generator_is_scored_the_same_way(tiny_pipeline):
    from biprompt.data.shapes_ref_b import make_samples as make_b

    res = evaluate_shapes(tiny_pipeline, n=4, seed=SEED, generator="b", reference=False)
    assert res["generator"] == "b" and set(res["methods"]) == set(METHODS)
    assert res["n_ambiguous"] == sum(s.ambiguous for s in make_b(4, SEED))
    assert "ShapesRef (b)" in format_table(res)
    with pytest.raises(ValueError, match="unknown generator"):
        evaluate_shapes(tiny_pipeline, n=1, generator="c")


@pytest.mark.parametrize("generator", ["a", "b"])
def test_reference_episodes_add_every_expert_combination(tiny_pipeline, generator):
    """The tiny profile has a reference model: by default every sample is a reference episode
    too, and the rows cover point, text, reference, the pairs, all three and the oracle."""
    res = evaluate_shapes(tiny_pipeline, n=4, seed=SEED, generator=generator)
    assert res["reference"] is True
    assert set(res["methods"]) == set(METHODS) | set(reference_methods())
    m = res["methods"]
    for name in ("point+reference", "point+text+reference (mean)",
                 "point+text+reference (confident)"):  # candidates: the oracle bounds them
        assert m[ORACLE]["all"]["miou"] >= m[name]["all"]["miou"] - 1e-12, name
    table = format_table(res)
    assert "| reference-only |" in table and "| point+text+reference (mean) |" in table


def test_reference_episodes_are_seeded_and_match_the_target_class():
    from biprompt.data.episodes import make_episodes, object_class
    from biprompt.data.shapes_ref import generate_scene

    samples = make_samples(6, SEED)
    a = make_episodes(samples, generate_scene, SEED, 256, 256)
    b = make_episodes(samples, generate_scene, SEED, 256, 256)
    for ea, eb, s in zip(a, b, samples, strict=True):
        assert object_class(ea.reference.objects[ea.reference_object]) == object_class(
            s.target_object)
        assert np.array_equal(ea.reference_mask, eb.reference_mask)
        assert ea.reference.image is not s.image

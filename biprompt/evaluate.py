"""Score a pipeline on ShapesRef (spec: shapes-ref.md, "Scoring"). Plain torch/numpy, no ray.

    python -m biprompt.evaluate shapes --n 500 --seed 12345 [--profile configs/models/demo.yaml]
                                       [--size 256x256] [--json out.json]

One encoder pass and ONE `segment(..., mode="biprompt")` call per sample; every method is derived
from that single result:
- point-only: the candidate with the highest predicted IoU;
- text-only: the text mask;
- BiPrompt: the candidate with the highest IoU against the text mask (the spec's rule, no
  fallback; ties go to the higher predicted IoU, then the lower index);
- BiPrompt (served): the mask the pipeline returns (with its agreement fallback);
- oracle: the candidate with the highest IoU against the ground truth (the ceiling of selection).

With a reference model (the profile's `reference_model`), every sample is also a reference
episode (biprompt.data.episodes: a reference object of the target's colour, shape and size from a
fresh scene of the same generator, annotated by its mask) and the rows add:
- reference-only: the reference expert's mask;
- point+reference: the candidate with the highest IoU against the reference mask;
- point+text+reference: the candidate the two experts pick together, under each selection rule
  (biprompt.selection.RULES: mean with the profile's weights, confident, the arbiter where the
  profile has one, and mean with equal weights), without the agreement fallback;
and BiPrompt (served) is then the answer with both experts voting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biprompt.data import shapes_ref, shapes_ref_b
from biprompt.data.episodes import make_episodes
from biprompt.metrics import Scores
from biprompt.selection import RULES, select

POINT, TEXT, BIPROMPT, SERVED, ORACLE = (
    "point-only", "text-only", "BiPrompt", "BiPrompt (served)", "oracle",
)  # fmt: skip
METHODS: tuple[str, ...] = (POINT, TEXT, BIPROMPT, SERVED, ORACLE)
REF_ONLY, POINT_REF = "reference-only", "point+reference"
ALL_RULES = {rule: f"point+text+reference ({rule})" for rule in RULES}
EQUAL_MEAN = "point+text+reference (mean, equal weights)"
REFERENCE_METHODS: tuple[str, ...] = (REF_ONLY, POINT_REF, *ALL_RULES.values(), EQUAL_MEAN)
SUBSETS: tuple[str, ...] = ("all", "ambiguous")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILES = ("configs/models/demo.yaml", "configs/models/tiny.yaml")


def summarize(scores: Scores) -> dict[str, float | None]:
    """{"miou", "ciou", "mdice"} of accumulated pairs; None (JSON null) when there were none."""

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    return {"miou": clean(scores.miou), "ciou": clean(scores.ciou), "mdice": clean(scores.mdice)}


def best_candidate(candidates: np.ndarray, scores: np.ndarray, reference: np.ndarray) -> int:
    """Index of the candidate with the highest IoU against `reference`; ties go to the higher
    predicted IoU, then the lower index (BiPrompt's rule, without its agreement fallback)."""
    return select(candidates, scores, reference, mode="text").selected


def method_masks(result, gt_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Each method's mask, all derived from one biprompt-mode SegmentResult."""
    cands, scores = result.candidates, np.asarray(result.candidate_scores, dtype=np.float64)
    return {
        POINT: cands[int(np.argmax(scores))],
        TEXT: result.text_mask,
        BIPROMPT: cands[best_candidate(cands, scores, result.text_mask)],
        SERVED: result.mask,
        ORACLE: cands[best_candidate(cands, scores, gt_mask)],
    }


def reference_methods(arbiter=None) -> tuple[str, ...]:
    """The reference rows (the arbiter's only with an arbiter)."""
    return tuple(m for m in REFERENCE_METHODS
                 if arbiter is not None or m != ALL_RULES["arbiter"])


def reference_method_masks(result, weights: dict | None = None,
                           arbiter=None) -> dict[str, np.ndarray]:
    """The reference rows' masks, from one result with both experts' masks (`weights`: the
    mean's, `arbiter`: the arbiter rule's model; the pipeline's)."""
    cands, scores = result.candidates, np.asarray(result.candidate_scores, dtype=np.float64)
    ref = result.expert_masks["reference"]
    both = {"text": result.text_mask, "reference": ref}
    out = {REF_ONLY: ref, POINT_REF: cands[select(cands, scores, {"reference": ref},
                                                  mode="reference").selected]}
    for rule, name in ALL_RULES.items():
        if rule == "arbiter" and arbiter is None:
            continue
        out[name] = cands[select(cands, scores, both, "biprompt", 0.0, rule, weights,
                                 arbiter).selected]
    out[EQUAL_MEAN] = cands[select(cands, scores, both, "biprompt", 0.0, "mean").selected]
    return out


# ShapesRef scene generators: ours, and a second one written from the spec alone
GENERATORS = {"a": shapes_ref.make_samples, "b": shapes_ref_b.make_samples}
SCENES = {"a": shapes_ref.generate_scene, "b": shapes_ref_b.generate_scene}


def evaluate_shapes(
    pipeline,
    n: int = 500,
    seed: int = 12345,
    height: int = 256,
    width: int = 256,
    progress: bool = False,
    generator: str = "a",
    reference: bool | None = None,
) -> dict:
    """Score every method on the first `n` ShapesRef samples of `seed` from `generator` (a: ours,
    b: biprompt.data.shapes_ref_b); a JSON-able dict. reference: also score the reference
    episodes (None: when the pipeline has a reference model)."""
    if pipeline.text is None:
        raise ValueError("evaluating ShapesRef needs a pipeline with a text model")
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; use one of {sorted(GENERATORS)}")
    samples = GENERATORS[generator](n, seed, height, width)
    if reference is None:
        reference = pipeline.reference is not None
    arbiter = getattr(pipeline, "arbiter", None)
    methods = METHODS + (reference_methods(arbiter) if reference else ())
    episodes = (make_episodes(samples, SCENES[generator], seed, height, width) if reference
                else [None] * len(samples))
    scores = {m: {s: Scores() for s in SUBSETS} for m in methods}
    strategies: Counter[str] = Counter()
    it = list(zip(samples, episodes, strict=True))
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(it, unit="sample", file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency of the full install
            pass
    t0 = time.perf_counter()
    for sample, episode in it:
        emb = pipeline.embed(sample.image)
        ref = None
        if episode is not None:
            ref = pipeline.encode_reference(episode.reference.image, mask=episode.reference_mask)
        res = pipeline.segment(emb, [list(sample.point_index)], text=sample.expression,
                               mode="biprompt", reference=ref)
        strategies[res.strategy] += 1
        masks = method_masks(res, sample.gt_mask)
        if episode is not None:
            masks.update(reference_method_masks(res, pipeline.expert_weights, arbiter))
        for method, mask in masks.items():
            scores[method]["all"].add(mask, sample.gt_mask)
            if sample.ambiguous:
                scores[method]["ambiguous"].add(mask, sample.gt_mask)
    seconds = time.perf_counter() - t0
    return {
        "n": n,
        "seed": seed,
        "generator": generator,
        "height": height,
        "width": width,
        "n_ambiguous": sum(bool(s.ambiguous) for s in samples),
        "model": dict(pipeline.model_ids),
        "reference": bool(reference),
        "methods": {m: {s: summarize(scores[m][s]) for s in SUBSETS} for m in methods},
        "seconds": round(seconds, 3),
        "strategies": dict(sorted(strategies.items())),
    }


def format_table(result: dict) -> str:
    """A Markdown table: one row per method, mIoU / cIoU / mDice overall and on ambiguous samples."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"ShapesRef ({result.get('generator', 'a')}): n={result['n']} seed={result['seed']} "
        f"size={result['width']}x"
        f"{result['height']} ambiguous={result['n_ambiguous']}",
        "",
        "| method | mIoU | cIoU | mDice | mIoU (amb.) | cIoU (amb.) | mDice (amb.) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, subsets in result["methods"].items():
        cells = [f(subsets[s][k]) for s in SUBSETS for k in ("miou", "ciou", "mdice")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WxH, e.g. 320x240; got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return w, h


def default_profile() -> Path:
    for rel in DEFAULT_PROFILES:
        if (REPO_ROOT / rel).is_file():
            return REPO_ROOT / rel
    return REPO_ROOT / DEFAULT_PROFILES[-1]


def resolve_profile(path: str | Path | None) -> Path:
    """A profile path as given (relative to the cwd), else relative to the repo root."""
    if path is None:
        return default_profile()
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).is_file() else p


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Score a BiPrompt pipeline offline.")
    sub = p.add_subparsers(dest="domain", required=True)
    s = sub.add_parser("shapes", help="ShapesRef v1 (spec: shapes-ref.md)")
    s.add_argument("--n", type=int, default=500, help="samples (default 500)")
    s.add_argument("--seed", type=int, default=12345)
    s.add_argument("--profile", default=None,
                   help="model profile YAML (default configs/models/demo.yaml if present, "
                        "else configs/models/tiny.yaml)")
    s.add_argument("--size", type=parse_size, default=(256, 256), metavar="WxH",
                   help="canvas, width x height (default 256x256)")
    s.add_argument("--json", dest="json_out", metavar="FILE", help="also write the result here")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="also score reference episodes (default: when the profile has a "
                        "reference_model)")
    s.add_argument("--generator", choices=sorted(GENERATORS), default="a",
                   help="scene generator: a (ours, the default) or b (a second one written from "
                        "the spec alone: biprompt/data/shapes_ref_b.py)")
    c = sub.add_parser("clicks", help="ShapesRef, interactive: clicks until the mask is right "
                       "(NoC@85/90, mIoU per click; biprompt/evaluate_clicks.py)")
    c.add_argument("--n", type=int, default=500, help="samples (default 500)")
    c.add_argument("--seed", type=int, default=12345)
    c.add_argument("--max-clicks", type=int, default=20)
    c.add_argument("--profile", default=None, help="model profile YAML (as for `shapes`)")
    c.add_argument("--size", type=parse_size, default=(256, 256), metavar="WxH")
    c.add_argument("--json", dest="json_out", metavar="FILE", help="also write the result here")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parser(prog).parse_args(argv)
    from biprompt.pipeline import BiPromptPipeline

    profile = resolve_profile(args.profile)
    if not profile.is_file():
        print(f"error: no model profile at {profile}", file=sys.stderr)
        return 2
    pipeline = BiPromptPipeline.from_config(profile)
    width, height = args.size
    if args.domain == "clicks":
        from biprompt.evaluate_clicks import evaluate_clicks
        from biprompt.evaluate_clicks import format_table as clicks_table

        result = evaluate_clicks(pipeline, n=args.n, seed=args.seed, height=height, width=width,
                                 max_clicks=args.max_clicks)
        result["profile"] = str(profile)
        print(clicks_table(result))
        print(f"\n{result['seconds']:.1f} s; model {result['model']}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result = evaluate_shapes(pipeline, n=args.n, seed=args.seed, height=height, width=width,
                             progress=not args.no_progress and sys.stderr.isatty(),
                             generator=args.generator, reference=args.reference)
    result["profile"] = str(profile)
    print(format_table(result))
    print(f"\n{result['seconds']:.1f} s; strategies {result['strategies']}; "
          f"model {result['model']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=os.environ.get("BIPROMPT_PROG")))  # `biprompt eval` names itself

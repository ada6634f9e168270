"""Fit the selection arbiter (biprompt.arbiter) for a model's text and reference experts.

    python -m biprompt.train.arbiter --model models/demo          # make train-demo's last stage

Runs the model's pipeline, exactly as it serves, over fresh ShapesRef reference episodes (our
generator, a: seed 20261204, 1,000 samples at each of 256x256 and 320x240, never the evaluation
seeds), and keeps the samples where the two experts pick different candidates. A logistic model
over the arbiter's features then learns which pick to take: it maximises the expected
ground-truth IoU of the chosen pick (sigmoid(z) * IoU(text's pick) + (1 - sigmoid(z)) *
IoU(reference's pick)) with a small L2 penalty, on standardised features. Writes
MODEL/arbiter.json and prints what each rule scores on the data it was fit on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from biprompt.arbiter import Arbiter, features, own_pick
from biprompt.selection import mask_ious

EXPERTS = ("text", "reference")
DEFAULT_SIZES = ((256, 256), (320, 240))  # (width, height)


def demo_profile(model: Path) -> dict:
    """A profile for the demo layout that make train-demo writes into `model`."""
    return {"name": "arbiter-fit", "sam": {"checkpoint": str(model / "sam_demo.pth"), "variant": "demo"},
            "text_model": {"checkpoint": str(model / "evf_demo")},
            "reference_model": {"checkpoint": str(model / "vrp_demo")},
            "selection": {"rule": "confident"}}


def collect(pipeline, n: int, seed: int, sizes=DEFAULT_SIZES, generator: str = "a") -> dict:
    """Per sample: the arbiter's features, both picks' ground-truth IoUs, and each rule's pick."""
    from biprompt.data.episodes import make_episodes
    from biprompt.evaluate import GENERATORS, SCENES

    rows: dict[str, list] = {"f": [], "differ": [], "gt_a": [], "gt_b": [], "gt_confident": [],
                             "gt_best": []}
    for width, height in sizes:
        samples = GENERATORS[generator](n, seed, height, width)
        episodes = make_episodes(samples, SCENES[generator], seed, height, width)
        for sample, episode in zip(samples, episodes, strict=True):
            emb = pipeline.embed(sample.image)
            ref = pipeline.encode_reference(episode.reference.image, mask=episode.reference_mask)
            res = pipeline.segment(emb, [list(sample.point_index)], text=sample.expression,
                                   mode="biprompt", reference=ref)
            cands, scores = res.candidates, np.asarray(res.candidate_scores, dtype=np.float64)
            ious = {"text": mask_ious(cands, res.text_mask),
                    "reference": mask_ious(cands, res.expert_masks["reference"])}
            agree = float(mask_ious(res.text_mask[None], res.expert_masks["reference"])[0])
            areas = cands.reshape(len(cands), -1).mean(axis=1)
            f, a, b = features(ious["text"], ious["reference"], scores, areas, agree)
            gt = mask_ious(cands, sample.gt_mask)
            lead = max(EXPERTS, key=lambda e: (float(ious[e].max()), -EXPERTS.index(e)))
            rows["f"].append(f)
            rows["differ"].append(a != b)
            rows["gt_a"].append(gt[a])
            rows["gt_b"].append(gt[b])
            rows["gt_confident"].append(gt[own_pick(ious[lead], scores)])
            rows["gt_best"].append(gt.max())
    return {k: np.array(v, dtype=np.float64) for k, v in rows.items()}


def fit(f: np.ndarray, gain: np.ndarray, l2: float = 1e-3, steps: int = 1500,
        lr: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, std, weights, bias) of a logistic choice: sigmoid(z) is the chance of taking the
    first pick, fit to maximise its expected `gain` (IoU of the first pick minus the second's)."""
    torch.manual_seed(seed)
    mean, std = f.mean(axis=0), f.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)  # a constant feature (none varies) adds nothing
    x = torch.tensor((f - mean) / std, dtype=torch.float64)
    y = torch.tensor(gain, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        p = torch.sigmoid(x @ w[:-1] + w[-1])
        loss = -(p * y).mean() + l2 * (w[:-1] ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = w.detach().numpy()
    return mean, std, out[:-1], float(out[-1])


def train(args) -> dict:
    from biprompt.pipeline import BiPromptPipeline

    t0 = time.perf_counter()
    model = Path(args.model)
    pipeline = BiPromptPipeline.from_profile(demo_profile(model))
    sizes = tuple(tuple(int(v) for v in s.split("x")) for s in args.sizes.split(","))
    data = collect(pipeline, args.n, args.seed, sizes, args.generator)
    collected = time.perf_counter() - t0
    differ = data["differ"] > 0  # only there does the choice matter
    if differ.sum() < 2:
        raise SystemExit(f"the experts picked different candidates on {int(differ.sum())} of "
                         f"{len(differ)} samples: too few to fit an arbiter on; raise --n")
    mean, std, weights, bias = fit(data["f"][differ], (data["gt_a"] - data["gt_b"])[differ],
                                   l2=args.l2, steps=args.steps)
    arb = Arbiter(experts=EXPERTS, mean=tuple(mean), std=tuple(std), weights=tuple(weights),
                  bias=bias, models={e: pipeline.model_ids[e] for e in EXPERTS})
    chosen = np.array([data["gt_a"][i] if arb.prefers_first(data["f"][i]) else data["gt_b"][i]
                       for i in range(len(data["f"]))])
    scores = {"text": data["gt_a"].mean(), "reference": data["gt_b"].mean(),
              "confident": data["gt_confident"].mean(), "arbiter": chosen.mean(),
              "better_of_the_two": np.maximum(data["gt_a"], data["gt_b"]).mean(),
              "oracle": data["gt_best"].mean()}
    summary = {"generator": args.generator, "seed": args.seed, "n_per_size": args.n,
               "sizes": [f"{w}x{h}" for w, h in sizes], "samples": len(data["f"]),
               "picks_differ": int(differ.sum()), "l2": args.l2, "steps": args.steps,
               "miou_on_fit_data": {k: round(float(v), 4) for k, v in scores.items()},
               "seconds": round(time.perf_counter() - t0, 1),
               "seconds_collecting": round(collected, 1)}
    arb = dataclasses.replace(arb, fit=summary)
    out = Path(args.out) if args.out else model / "arbiter.json"
    arb.save(out)
    summary["out"] = str(out)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m biprompt.train.arbiter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the demo model's directory (make train-demo)")
    p.add_argument("--out", help="where to write the arbiter (default MODEL/arbiter.json)")
    p.add_argument("--n", type=int, default=1000, help="samples per canvas size")
    p.add_argument("--seed", type=int, default=20261204)
    p.add_argument("--sizes", default="256x256,320x240", help="canvases, WxH,WxH")
    p.add_argument("--generator", default="a", choices=("a", "b"))
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 32 for s in sizes):
        p.error(f"--sizes is {args.sizes!r}; give WxH,WxH (e.g. 256x256,320x240)")
    if args.n < 1:
        p.error("--n must be at least 1")
    return args


def main(argv=None) -> dict:
    summary = train(parse_args(argv))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

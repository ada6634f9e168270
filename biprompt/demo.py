"""`make demo`: segment ShapesRef scenes with the in-process pipeline and write overlays.

Until the trained demo model lands, this runs the `tiny` profile: random weights, so the masks
are meaningless; the run shows the whole path (embed once, point + text, select) working.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from biprompt.data.shapes_ref import make_samples
from biprompt.metrics import Scores
from biprompt.pipeline import BiPromptPipeline


def main(argv: list[str] | None = None) -> int:
    from biprompt_client.overlay import grid, render_overlay

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/models/tiny.yaml")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = BiPromptPipeline.from_config(args.config)
    load_s = time.perf_counter() - t0
    scores = Scores()
    tiles, strategies = [], {}
    t0 = time.perf_counter()
    for s in make_samples(args.n, args.seed):
        point = [list(s.point_index)]
        res = pipe.segment(s.image, point, text=s.expression)
        scores.add(res.mask, s.gt_mask)
        strategies[res.strategy] = strategies.get(res.strategy, 0) + 1
        tiles.append(render_overlay(s.image, res.mask, point, text=s.expression))
    run_s = time.perf_counter() - t0
    grid(tiles).save(out / "overlays.png")
    summary = {
        "profile": pipe.name, "models": pipe.model_ids, "samples": args.n,
        "load_s": round(load_s, 2), "seconds_per_sample": round(run_s / max(args.n, 1), 3),
        "strategies": strategies, **{k: (round(v, 4) if isinstance(v, float) else v)
                                     for k, v in scores.summary().items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if "random" in str(pipe.model_ids):
        print("NOTE: the 'tiny' profile has random weights: these masks are meaningless. "
              "It exercises the pipeline end to end; the trained demo model comes next.")
    print(f"wrote {out / 'overlays.png'} and {out / 'summary.json'}")
    return 0 if np.isfinite(scores.miou) else 1


if __name__ == "__main__":
    raise SystemExit(main())

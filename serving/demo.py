"""`make demo`: the whole product on this machine. It starts the Serve app (local Ray, in-process
cache, the bundled ShapesRef demo model), prints the URL of its web page (`/demo/`), sends a few
dozen ShapesRef samples through the Python SDK, and writes overlays and the accuracy table under
out/demo/. Then it shuts everything down, unless `--serve` (`make demo SERVE=1`) keeps the app
up until Ctrl-C; `--n 0` skips the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from biprompt_client import BiPromptClient
from biprompt_client.overlay import grid, render_overlay

from biprompt.data.shapes_ref import iter_samples
from biprompt.evaluate import METHODS, SUBSETS, format_table, method_masks, summarize
from biprompt.metrics import Scores
from biprompt.types import SegmentResult
from serving.launch import start_app, stop_app

REPO = Path(__file__).resolve().parent.parent
DEMO_PROFILE = REPO / "configs/models/demo.yaml"


def _as_result(seg) -> SegmentResult:
    """An SDK Segmentation -> the library's SegmentResult, so evaluation code serves both."""
    cands = np.stack([c.mask for c in seg.candidates])
    scores = np.array([c.predicted_iou for c in seg.candidates])
    return SegmentResult(seg.mask, cands, scores, seg.text_mask, None, seg.selected,
                         seg.strategy, seg.agreement, "biprompt")


def run(url: str, n: int, seed: int, per_scene: int, out: Path) -> dict:
    samples = [s for s, _ in zip(iter_samples(seed, samples_per_scene=per_scene), range(n),
                                  strict=False)]
    reqs = [{"image": s.image, "points": [list(s.point_index)], "text": s.expression,
             "return_candidates": True, "return_text_mask": True} for s in samples]
    with BiPromptClient(url, timeout=120) as client:
        results = client.segment_many(reqs, concurrency=4, progress=True)
        stats = client.last_batch_stats
    scores = {m: {s: Scores() for s in SUBSETS} for m in METHODS}
    tiles = []
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for i, (s, r) in enumerate(zip(samples, results, strict=True)):
        if not r.ok:
            raise RuntimeError(f"sample {i} failed: {r.error}")
        for method, mask in method_masks(_as_result(r), s.gt_mask).items():
            scores[method]["all"].add(mask, s.gt_mask)
            if s.ambiguous:
                scores[method]["ambiguous"].add(mask, s.gt_mask)
        tile = render_overlay(s.image, r.mask, [s.point], text=f"{s.expression} [{r.strategy}]")
        tile.save(out / "overlays" / f"{i:03d}.png")
        tiles.append(tile)
    grid(tiles[:16], columns=4).save(out / "overlays.png")
    return {
        "n": n, "seed": seed, "height": 256, "width": 256,
        "n_ambiguous": sum(bool(s.ambiguous) for s in samples),
        "model": results[0].model if results else None,
        "methods": {m: {s: summarize(scores[m][s]) for s in SUBSETS} for m in METHODS},
        "client": stats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(DEMO_PROFILE))
    ap.add_argument("--n", type=int, default=48, help="samples to send")
    ap.add_argument("--per-scene", type=int, default=2, help="samples per scene (cache hits)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--cache-url", default=os.environ.get("BIPROMPT_CACHE_URL"),
                    help="redis://... (default: the in-process cache)")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--serve", action="store_true",
                    help="keep serving (the API and the page) until Ctrl-C")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url, up_s = start_app(Path(args.profile), args.cache_url)
    # NOTE: after ray.init, which sets handlers of its own. Ctrl-C and SIGTERM both unwind
    # through stop_app, also where SIGINT came in ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"Serve app up at {url} in {up_s:.1f} s (profile {Path(args.profile).name})")
    print(f"Try it in a browser: {url}/demo/"
          + ("" if args.serve else "  (make demo SERVE=1 keeps it up until Ctrl-C)"), flush=True)
    result = None
    try:
        if args.n > 0:
            t = time.perf_counter()
            result = run(url, args.n, args.seed, args.per_scene, out)
            result["seconds"] = round(time.perf_counter() - t, 2)
            report(result, out)
        if args.serve:
            print(f"Serving {url}/demo/ until Ctrl-C", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stop_app()
    return 0 if result is not None or args.n <= 0 else 1


def report(result: dict, out: Path) -> None:
    table = format_table(result)
    (out / "accuracy.md").write_text(table + "\n")
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    c = result["client"]
    print(table)
    print(f"\n{c['items']} requests over {c['images']} images in {result['seconds']} s: "
          f"{c['embed_calls']} encoder passes, {c['cache_hits']} cache hits")
    print(f"wrote {out / 'overlays.png'}, {out / 'overlays'}/*.png, {out / 'accuracy.md'}, "
          f"{out / 'accuracy.json'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

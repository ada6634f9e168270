"""Run every benchmark of the issue in one go and write BENCHMARKS.md (and the raw JSON).

    .venv/bin/python -m benchmarks.run            # make bench: more runs per row
    .venv/bin/python -m benchmarks.run --quick    # make bench-quick: a few minutes

Order: machine facts; the vit_b encoder (reference, fast path, matmul-bound limit); the naive
pipeline at both scales; then one local Ray cluster serving the demo model and then the vit_b-shaped
random model, with the same scenarios; last, what each replica of a fresh vit_b-shaped app holds
in memory after one cold request, next to one process holding the whole pipeline (the same in
both modes: one request); then the offline batch on Ray Data against the served batch paths
(benchmarks/offline.py, its own section). Everything is measured in this run; ratios are of
numbers measured here. Served scenes come from a fresh seed each run (recorded), so "cold" is
cold even with a Redis cache that outlived an earlier run.
"""

from __future__ import annotations

import argparse
import gc
import json
import secrets
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks import cpu_backends as backends_bench
from benchmarks import encoder as encoder_bench
from benchmarks import gpu as gpu_bench
from benchmarks import machine
from benchmarks import memory as memory_bench
from benchmarks import offline as offline_bench
from benchmarks.checkpoints import write_vitb_checkpoints
from benchmarks.naive import STAGES, NaiveBiPrompt
from benchmarks.report import render
from benchmarks.serving import (
    Bench,
    Plan,
    Scenes,
    deploy,
    find_direct_url,
    run_scenarios,
    start_cluster,
    text_cached_clicks,
)
from benchmarks.stats import summary

REPO = Path(__file__).resolve().parent.parent
DEMO_PROFILE = REPO / "configs/models/demo.yaml"

# Requests per row. Quick mode keeps the whole run to a few minutes on 2 cores.
SETTINGS = {
    "quick": {"encoder": (1, 2), "naive_vitb": 1, "naive_demo": 10,
              "demo": Plan(cold=5, warm=20, per_level=20),
              "vitb": Plan(cold=2, warm=5, session_clicks=20, many=False, per_level=2,
                           image_size=(480, 640), extra={"text_cached": 10})},
    "full": {"encoder": (3, 5), "naive_vitb": 3, "naive_demo": 30,
             "demo": Plan(cold=20, warm=40, per_level=40),
             "vitb": Plan(cold=3, warm=10, session_clicks=20, many=True, per_level=4,
                          image_size=(480, 640), extra={"text_cached": 30})},
}


def redis_url(url: str | None) -> str | None:
    """The cache to serve with: `url` if Redis answers there, else None (in-process LRU)."""
    if not url:
        return None
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=0.5).ping()
    except Exception:  # noqa: BLE001 - any failure means: no Redis here
        return None
    return url


def run_naive(profile: Path, n: int, size: tuple[int, int], seed: int) -> dict:
    from biprompt.data.shapes_ref import make_samples

    naive = NaiveBiPrompt.from_profile(profile)
    samples = make_samples(n + 1, seed, *size)
    naive.segment(samples[0].image, samples[0].point_index, samples[0].expression)  # warm-up
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for s in samples[1:]:
        out = naive.segment(s.image, s.point_index, s.expression)
        for k in STAGES:
            stages[k].append(out["timings_s"][k] * 1000)
    del naive
    gc.collect()
    return {"latency_ms": summary(stages["total"]),
            "stages_ms": {k: statistics.median(v) for k, v in stages.items()},
            "encoder_passes_per_request": 2, "requests": n}


def serve_all(plans: dict[str, tuple[Path, Plan]], cache_url: str | None, seed: int) -> dict:
    from ray import serve

    from deployments.driver import DriverCalls

    out = {}
    port = start_cluster()
    calls = DriverCalls()
    try:
        for scale, (profile, plan) in plans.items():
            url, startup = deploy(port, str(profile), scale, cache_url)
            bench = Bench(url, scale, calls)
            plan.direct_url = find_direct_url(scale)
            rows = run_scenarios(bench, plan, seed)
            rows["direct_url"] = plan.direct_url
            rows["startup_s"] = startup
            rows["torch_threads"] = {d: calls.call(scale, d, "stats").get("torch_threads")
                                     for d in ("ImageEncoder", "PointDecoder", "TextMask")}
            if plan.extra.get("text_cached"):
                rows["text_cached"] = text_cached_clicks(bench, Scenes(seed + 7, plan.image_size),
                                                         plan.extra["text_cached"])
            out[scale] = rows
            serve.delete(scale)
            if plan.extra.get("text_cached"):  # the same clicks with every role on `auto`
                out[f"{scale}_auto"] = served_backends(port, profile, f"{scale}_auto", calls,
                                                       cache_url, plan, seed)
    finally:
        calls.close()
        serve.shutdown()
        import ray

        ray.shutdown()
    return out


def served_backends(port: int, profile: Path, app: str, calls, cache_url: str | None,
                    plan: Plan, seed: int, backends: str = "auto") -> dict:
    """The app with every role on `backends` (the CPU backends issue's default): its start-up
    (which measures the backends, unless a choice is remembered), what each replica runs, and
    the text-cached warm clicks."""
    from ray import serve

    url, startup = deploy(port, str(profile), app, cache_url,
                          backends={r: backends for r in ("encoder", "points", "text")})
    bench = Bench(url, app, calls)
    try:
        row = text_cached_clicks(bench, Scenes(seed + 8, plan.image_size),
                                 plan.extra["text_cached"])
        runs = {d: calls.call(app, d, "stats").get("backend")
                for d in ("ImageEncoder", "PointDecoder", "TextMask")}
    finally:
        serve.delete(app)
    return {"text_cached": row, "startup_s": startup, "backends": runs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs per row (a few minutes)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(REPO / "out/bench/results.json"))
    ap.add_argument("--checkpoints", default=str(REPO / "out/bench/checkpoints"),
                    help="where the vit_b-shaped random checkpoints are written (reused)")
    ap.add_argument("--cache-url", default="redis://127.0.0.1:6379/0",
                    help="Redis for the served runs if it answers; else the in-process cache")
    ap.add_argument("--seed", type=int, default=None, help="scene seed (default: fresh)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite --out from a run's "
                    "results (no measuring)")
    args = ap.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        write_report(results, Path(args.out))
        print(f"wrote {args.out} from {args.render}")
        return results
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    t0 = time.perf_counter()
    results: dict = {"mode": mode, "seed": seed, "machine": machine.facts()}

    def step(name: str) -> None:
        print(f"[bench {time.perf_counter() - t0:6.0f} s] {name}", flush=True)

    step("vit_b encoder: reference, fast path, GEMM rate")
    ref_runs, fast_runs = cfg["encoder"]
    results["encoder"] = encoder_bench.run(ref_runs, fast_runs)
    gc.collect()

    step("vit_b-shaped random checkpoints")
    ckpt = write_vitb_checkpoints(Path(args.checkpoints))
    results["checkpoints"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in ckpt.items()}

    step("CPU backends, vit_b scale: torch, onnxruntime, openvino and auto's choice per stage")
    results["cpu_backends"] = backends_bench.run(args.checkpoints, rounds=3 if args.quick else 5)
    gc.collect()

    step("naive BiPrompt, vit_b scale")
    results["naive"] = {"vitb": run_naive(ckpt["profile"], cfg["naive_vitb"], (480, 640), seed)}
    step("naive BiPrompt, demo scale")
    results["naive"]["demo"] = run_naive(DEMO_PROFILE, cfg["naive_demo"], (256, 256), seed)

    cache_url = redis_url(args.cache_url)
    results["cache"] = cache_url or "in-process LRU"
    step(f"served scenarios (cache: {results['cache']})")
    plans = {"demo": (DEMO_PROFILE, cfg["demo"]), "vitb": (ckpt["profile"], cfg["vitb"])}
    results["served"] = serve_all(plans, cache_url, seed)
    step("per-replica memory, vit_b scale")
    results["memory"] = memory_bench.run(ckpt["profile"], seed)
    step("offline batch: Ray Data against segment_many and the batch endpoint")
    results["offline"] = offline_bench.run(mode, {"demo": DEMO_PROFILE, "vitb": ckpt["profile"]},
                                           seed)
    results["seconds"] = time.perf_counter() - t0
    step("writing the report")

    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, default=_jsonable))
    write_report(results, Path(args.out))
    print(f"wrote {args.out} and {out_json} in {results['seconds']:.0f} s")
    return results


def write_report(results: dict, out: Path) -> None:
    """BENCHMARKS.md from a run's results, keeping benchmarks/gpu.py's section."""
    text = render(results)
    if "cpu_backends" in results:
        text += "\n" + backends_bench.section(results["cpu_backends"], results.get("served"))
    if "offline" in results:
        text += "\n" + offline_bench.section(results["offline"])
    kept = gpu_bench.kept_section(out.read_text()) if out.exists() else None
    out.write_text(gpu_bench.splice(text, kept) if kept else text)


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


if __name__ == "__main__":
    main()

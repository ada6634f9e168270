"""SAM vit_b's image encoder at 1024x1024: the reference forward, the fast path, and the
matmul-bound limit (the model's FLOPs over the fp32 GEMM rate measured in the same run).

    .venv/bin/python -m benchmarks.encoder --reference-runs 2 --fast-runs 3

Random weights (SAM's own init, with the zero-initialised position parameters drawn at random so
the relative-position bias does real work). FLOPs are counted by ``FlopCounterMode`` on a
meta-device copy of the reference forward: matmuls and convolutions, 972 GFLOP for vit_b.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import biprompt  # noqa: F401  (must precede segment_anything: installs torchvision stand-ins)
from benchmarks.machine import gemm_rate
from biprompt.models.fast_attention import set_fast_attention
from biprompt.models.sam import build_sam, get_sam_spec

SIZE = 1024


def vit_b_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    encoder = build_sam(get_sam_spec("vit_b")).image_encoder.eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, 0.1)
    return encoder


def count_flops(encoder: torch.nn.Module, fast: bool) -> int:
    """Matmul + conv FLOPs of one forward, on a meta-device copy (nothing is computed)."""
    meta = copy.deepcopy(encoder).to("meta")
    set_fast_attention(meta, fast)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.device("meta"), counter:
        meta(torch.empty(1, 3, SIZE, SIZE))
    return counter.get_total_flops()


def stats(times: list[float]) -> dict:
    xs = sorted(times)
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "p95": xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))], "runs": xs}


def run(reference_runs: int = 1, fast_runs: int = 3, seed: int = 0) -> dict:
    """Time both forwards, interleaved so that load from elsewhere hits both alike."""
    encoder = vit_b_encoder(seed)
    x = torch.randn(1, 3, SIZE, SIZE)
    flops = count_flops(encoder, fast=False)
    flops_fast = count_flops(encoder, fast=True)
    gemm_before = gemm_rate()
    times: dict[str, list[float]] = {"reference": [], "fast": []}
    outputs = {}
    with torch.inference_mode():
        set_fast_attention(encoder, True)
        encoder(x)  # warm-up (thread pool, allocator); the reference needs none at 9+ s a pass
        for i in range(max(reference_runs, fast_runs)):
            for label, n in (("reference", reference_runs), ("fast", fast_runs)):
                if i >= n:
                    continue
                set_fast_attention(encoder, label == "fast")
                start = time.perf_counter()
                outputs[label] = encoder(x)
                times[label].append(time.perf_counter() - start)
    gemm_after = gemm_rate()
    # The machine is shared: the better of the two GEMM measurements is its rate.
    rate = max(gemm_before["best_gflops"], gemm_after["best_gflops"])
    limit = flops / (rate * 1e9)
    ref, fast = stats(times["reference"]), stats(times["fast"])
    return {
        "input": [1, 3, SIZE, SIZE],
        "threads": torch.get_num_threads(),
        "flops": flops,
        "flops_fast_path": flops_fast,
        "gemm_before": gemm_before,
        "gemm_after": gemm_after,
        "gemm_gflops": rate,
        "limit_s": limit,
        "reference_s": ref,
        "fast_s": fast,
        "fast_over_limit": fast["median"] / limit,
        "reference_over_limit": ref["median"] / limit,
        "speedup": ref["median"] / fast["median"],
        "max_abs_diff": (outputs["fast"] - outputs["reference"]).abs().max().item(),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-runs", type=int, default=2)
    ap.add_argument("--fast-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if min(args.reference_runs, args.fast_runs) < 1:
        ap.error("runs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.reference_runs, args.fast_runs)
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

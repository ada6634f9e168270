"""SAM's point decoder on the CPU at vit_b scale: torch vs ONNX Runtime, one batched call vs a
loop of single calls.

    .venv/bin/python -m benchmarks.onnx_decoder [--rounds 5] [--json out/bench/decoder.json]

Random vit_b weights (benchmarks/checkpoints.py, reused), loaded through the project's own loading
code, and a random embedding of a 480x640 image. Each case runs end to end through
`decode_points` (prompts transformed, decoded, masks upscaled to 480x640 and thresholded): one
point with three masks, and 16 one-point prompts on the image as one batched call and as 16
single calls. Rounds alternate between the configurations, so load from elsewhere hits them
alike; the table gives medians. Every answer is compared with torch's batched one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.checkpoints import write_vitb_checkpoints
from biprompt.engines import point_decoder_for
from biprompt.factory import open_sam
from biprompt.preprocess import sam_input_size
from biprompt.prompts import make_prompt
from biprompt.types import ImageEmbedding

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "onnxruntime")
CASES = ("1 point", "16 batched", "16 looped")  # (prompts, batched)
SHAPES = {"1 point": (1, True), "16 batched": (16, True), "16 looped": (16, False)}


def _prompts(size: tuple[int, int], n: int, seed: int) -> list:
    h, w = size
    rng = np.random.default_rng(seed)
    return [make_prompt(size, [[rng.uniform(0, w - 1), rng.uniform(0, h - 1)]], mode="point")
            for _ in range(n)]


def _max_diff(ref: list, got: list) -> float:
    return max(float(np.abs(r.low_res_logits - g.low_res_logits).max())
               for r, g in zip(ref, got, strict=True))


def run(checkpoints: str | Path = REPO / "out/bench/checkpoints", rounds: int = 5,
        size: tuple[int, int] = (480, 640), seed: int = 0,
        cache_dir: str | Path | None = None) -> dict:
    """Time every (backend, case) over `rounds` alternating rounds. Returns the medians (ms), the
    largest low-res logit difference from torch batched, and the export / load seconds."""
    ckpt = write_vitb_checkpoints(Path(checkpoints))
    src = open_sam(ckpt["sam"])
    engines, load_s = {}, {}
    for backend in BACKENDS:
        t = time.perf_counter()
        options = {"cache_dir": cache_dir} if backend == "onnxruntime" else {}
        engines[backend] = point_decoder_for(src, backend, batching="batched", **options)
        load_s[backend] = time.perf_counter() - t
    onnx = engines["onnxruntime"]
    spec = src.spec
    g = torch.Generator().manual_seed(seed)
    emb = ImageEmbedding(torch.randn(1, spec.prompt_dim, spec.embedding_size, spec.embedding_size,
                                     generator=g),
                         size, sam_input_size(size, spec.img_size), src.model_id)
    prompts = {1: _prompts(size, 1, seed), 16: _prompts(size, 16, seed + 1)}

    def decode(backend: str, case: str) -> list:
        n, batched = SHAPES[case]
        engines[backend].batching.batched = batched
        return engines[backend].decode_points(emb, prompts[n])

    answers = {(b, c): decode(b, c) for b in BACKENDS for c in CASES}  # warm-up, and parity
    times: dict[tuple[str, str], list[float]] = {k: [] for k in answers}
    for _ in range(rounds):
        for backend in BACKENDS:
            for case in CASES:
                t = time.perf_counter()
                decode(backend, case)
                times[(backend, case)].append((time.perf_counter() - t) * 1000.0)
    rows = []
    for (backend, case), ts in times.items():
        n, batched = SHAPES[case]
        ref = answers[("torch", "1 point" if n == 1 else "16 batched")]
        rows.append({"backend": backend, "case": case, "prompts": n, "batched": batched,
                     "median_ms": statistics.median(ts), "min_ms": min(ts),
                     "max_logit_diff": _max_diff(ref, answers[(backend, case)])})
    med = {(r["backend"], r["case"]): r["median_ms"] for r in rows}
    best16 = {b: min(med[(b, "16 batched")], med[(b, "16 looped")]) for b in BACKENDS}
    return {
        "size": list(size), "rounds": rounds, "threads": torch.get_num_threads(),
        "rows": rows,
        "batching_choice": {b: "batched" if med[(b, "16 batched")] <= med[(b, "16 looped")]
                            else "looped" for b in BACKENDS},
        "onnx_over_torch": {"1 point": med[("torch", "1 point")] / med[("onnxruntime", "1 point")],
                            "16 points": best16["torch"] / best16["onnxruntime"]},
        "load_s": load_s, "exported": onnx.export["exported"], "export_dir": onnx.export["dir"],
    }


def table(result: dict) -> str:
    """The result as a markdown table: one row per backend."""
    med = {(r["backend"], r["case"]): r for r in result["rows"]}
    lines = ["| backend | 1 point, 3 masks (ms) | 16 points, batched (ms) | 16 points, 16 calls "
             "(ms) | chosen for 16 | max logit diff vs torch |", "|---|---:|---:|---:|---|---:|"]
    for b in BACKENDS:
        cells = [f"{med[(b, c)]['median_ms']:,.1f}" for c in CASES]
        diff = max(med[(b, c)]["max_logit_diff"] for c in CASES)
        lines.append(f"| {b} | {' | '.join(cells)} | {result['batching_choice'][b]} | "
                     f"{diff:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--checkpoints", default=str(REPO / "out/bench/checkpoints"))
    ap.add_argument("--cache-dir", default=None, help="ONNX export cache (default: beside the "
                    "Hugging Face cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = run(args.checkpoints, args.rounds, cache_dir=args.cache_dir)
    print(table(result))
    r = result["onnx_over_torch"]
    print(f"{result['threads']} threads, {result['rounds']} rounds, image "
          f"{result['size'][1]}x{result['size'][0]}; onnxruntime over torch: {r['1 point']:.2f}x "
          f"(1 point), {r['16 points']:.2f}x (16 points, each its better mode); exported now: "
          f"{result['exported'] or 'nothing (cached)'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

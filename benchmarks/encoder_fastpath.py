"""Time SAM's vit_b image encoder: reference attention vs the fast path, against a matmul bound.

    .venv/bin/python benchmarks/encoder_fastpath.py --size 1024 --repeats 2

Reports the median wall time of each path, their ratio, a large fp32 GEMM rate measured on this
machine, the encoder's FLOP count (``FlopCounterMode`` on a meta-device copy: convolutions and
matmuls only) and the matmul-bound limit = FLOPs / GEMM rate. Random weights (SAM's own init, with
the zero-initialised position parameters randomised so the relative bias is not trivially zero).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

import biprompt  # noqa: F401  (must precede segment_anything: installs torchvision stand-ins)
from biprompt.models.fast_attention import set_fast_attention

# isort: split
from segment_anything.modeling.image_encoder import ImageEncoderViT


def vit_b_encoder(img_size: int) -> ImageEncoderViT:
    """The image encoder of ``segment_anything.build_sam_vit_b()``, for any input size."""
    return ImageEncoderViT(
        depth=12,
        embed_dim=768,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=12,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=[2, 5, 8, 11],
        window_size=14,
        out_chans=256,
    )


def gemm_gflops(n: int, repeats: int) -> tuple[float, float]:
    """(best, median) GFLOP/s of an n x n x n fp32 matmul."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return flops / min(times) / 1e9, flops / statistics.median(times) / 1e9


def encoder_flops(encoder: torch.nn.Module, size: int, fast: bool) -> int:
    """Matmul + conv FLOPs of one forward, counted on a meta-device copy (no compute)."""
    meta = copy.deepcopy(encoder).to("meta")
    set_fast_attention(meta, fast)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.device("meta"), counter:
        meta(torch.empty(1, 3, size, size))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="input side (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs per path first")
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    encoder = vit_b_encoder(args.size).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, 0.2)
    x = torch.randn(1, 3, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)}")

    flops_ref = encoder_flops(encoder, args.size, fast=False)
    flops_fast = encoder_flops(encoder, args.size, fast=True)
    best_rate, median_rate = gemm_gflops(args.gemm_size, repeats=5)
    print(
        f"fp32 GEMM {args.gemm_size}^3 (before): best {best_rate:.1f} GFLOP/s, median {median_rate:.1f}"
    )
    print(
        f"encoder FLOPs (matmul+conv): model {flops_ref / 1e9:.1f} GFLOP; "
        f"fast path executes {flops_fast / 1e9:.1f} GFLOP (augmented/padded attention)"
    )

    # Interleave the two paths so that load from other processes hits both alike.
    runs: dict[str, list[float]] = {"reference": [], "fast": []}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for label, fast in (("reference", False), ("fast", True)):
                set_fast_attention(encoder, fast)
                start = time.perf_counter()
                outputs[label] = encoder(x)
                if i >= args.warmup:
                    runs[label].append(time.perf_counter() - start)
        set_fast_attention(encoder, False)
    results = {label: statistics.median(times) for label, times in runs.items()}
    for label, times in runs.items():
        print(f"{label:>9}: median {results[label]:.2f} s  runs {[round(t, 2) for t in times]}")
    diff = (outputs["fast"] - outputs["reference"]).abs().max().item()
    print(f"max-abs difference of the embeddings (fast vs reference): {diff:.3g}")

    # The machine is shared: measure the GEMM again afterwards and keep the better rate.
    best_after, median_after = gemm_gflops(args.gemm_size, repeats=5)
    print(
        f"fp32 GEMM {args.gemm_size}^3 (after): best {best_after:.1f} GFLOP/s, median {median_after:.1f}"
    )
    best_rate = max(best_rate, best_after)
    limit = flops_ref / (best_rate * 1e9)
    print(f"speed-up reference/fast: {results['reference'] / results['fast']:.2f}x")
    print(
        f"matmul-bound limit: {limit:.2f} s (model FLOPs / best GEMM rate {best_rate:.1f}); "
        f"fast / limit = {results['fast'] / limit:.2f}x, "
        f"reference / limit = {results['reference'] / limit:.2f}x"
    )


if __name__ == "__main__":
    main()

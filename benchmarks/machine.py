"""What the benchmarks ran on, and the fp32 GEMM rate that sets the matmul-bound limit."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def gemm_rate(n: int = 4096, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n x n fp32 matmul (torch's BLAS, this process's threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return {"n": n, "best_gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9}


def _lscpu() -> dict[str, str]:
    if not shutil.which("lscpu"):
        return {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def facts() -> dict:
    cpu = _lscpu()
    flags = cpu.get("Flags", "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "redis", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "cpu": cpu.get("Model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "simd": simd,
        "l2": cpu.get("L2 cache"),
        "l3": cpu.get("L3 cache"),
        "memory_gib": _memory_gib(),
        "versions": versions,
    }

"""Summaries the benchmark tables use."""

from __future__ import annotations

import statistics


def summary(values) -> dict:
    """n, median, p95 (nearest rank), min and max of a list of numbers ({} when empty)."""
    xs = sorted(values)
    if not xs:
        return {}
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"n": len(xs), "median": statistics.median(xs), "p95": p95, "min": xs[0],
            "max": xs[-1]}

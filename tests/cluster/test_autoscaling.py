"""The encoder autoscales 1 -> 2 under a load ramp and back to 1 after it, losing nothing."""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import all_stats, wait_until
from tests.support.load import Load, p

pytestmark = pytest.mark.cluster


def test_encoder_scales_up_under_load_and_back_down(app_url, cluster, watch):
    t0 = time.monotonic()
    wait_until(lambda: watch.running("ImageEncoder") == 1, 60, "encoder at its 1 replica")
    load = Load(app_url, 1, cold_share=1.0, seed=11).start(max_threads=6)  # cold: all encode
    try:
        time.sleep(3)
        t_ramp = time.monotonic()
        load.set_concurrency(6)
        up_s = wait_until(lambda: watch.running("ImageEncoder") >= 2, 90, "scale-up to 2")
        encoders = list(all_stats("ImageEncoder", 2).values())
        time.sleep(3)
        t_calm = time.monotonic()
        load.set_concurrency(1)  # requests keep flowing while a replica drains
        down_s = wait_until(lambda: watch.running("ImageEncoder") == 1, 90, "scale-down to 1")
        time.sleep(2)
    finally:
        samples = load.stop()
    timeline = [(round(t - t0, 1), n) for t, n in watch.timeline("ImageEncoder", since=t0)]
    print(f"\nImageEncoder replicas over time (s, running): {timeline}")
    print(f"load x6 at {t_ramp - t0:.1f} s, 2 replicas {up_s:.1f} s later; load x1 at "
          f"{t_calm - t0:.1f} s, 1 replica {down_s:.1f} s later; {len(samples)} requests, "
          f"p50 {p(samples, 50):.0f} ms, p99 {p(samples, 99):.0f} ms")
    failed = [s.error for s in samples if not s.ok]
    assert failed == [], failed
    counts = [n for _, n in timeline]
    assert counts[0] == 1 and max(counts) >= 2 and counts[-1] == 1, timeline
    # max_replicas_per_node: the new replica went to the other worker
    assert len({s["node_id"] for s in encoders}) == 2
    # each ran its dummy forward inside its constructor, which Serve waits for before it
    # routes a request there: no request met a cold replica
    for s in encoders:
        proc = s["process"]
        assert proc["warmup_s"] is not None and proc["constructor_s"] >= proc["warmup_s"], proc
    served_during_drain = [s for s in samples if s.t0 >= t_calm]
    assert served_during_drain, "no request ran while the extra replica drained"

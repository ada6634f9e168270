"""Faults under a steady load of 4 SDK clients (retries on, the SDK's defaults): kill -9 of an
ImageEncoder, a TextMask and an Ingress replica, Redis stopped and started again, a whole worker
node removed (and a fresh one joining, as a cloud autoscaler replaces a lost machine). Serve must
restart what died by itself; the SDK's retries must lose nothing.

Each test prints its row and adds it to out/cluster/faults.md:
- sent: requests sent in the run; failed: those that failed after the SDK's retries;
- p99 during: latency of the requests in flight between the fault and the restore;
- restored: seconds from the fault until Serve reports the deployment back at its replica count
  (a new process in place of the dead one) or Redis answers again;
- normal: seconds from the fault until the last answer that failed or took over twice the
  p99 of the minute before the fault; after it, service is as before.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import add_worker, all_stats, replica_actors, wait_until
from tests.support.load import Load, Sample, between, p
from tests.support.scenes import png_bytes, scene

pytestmark = pytest.mark.cluster

REPORT = Path("out/cluster/faults.md")
CONCURRENCY = 4
BASELINE_S, SETTLE_S = 5.0, 5.0
ROWS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not ROWS:
        return
    head = "| fault | sent | failed after retries | p50 before (ms) | p99 during (ms) | " \
           "restored (s) | normal (s) | what failed requests saw |\n" \
           "|---|---|---|---|---|---|---|---|\n"
    lines = [f"| {r['fault']} | {r['sent']} | {r['failed']} | {r['p50_before']:.0f} | "
             f"{r['p99_during']:.0f} | {r['restored_s']:.1f} | {r['normal_s']:.1f} | "
             f"{'; '.join(r['errors']) or '-'} |" for r in ROWS]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(head + "\n".join(lines) + "\n")
    print("\n" + head + "\n".join(lines))


def run_under_load(app_url: str, name: str, fault, restored, seed: int,
                   timeout_s: float = 120.0) -> tuple[dict, list[Sample]]:
    load = Load(app_url, CONCURRENCY, cold_share=0.5, seed=seed).start()
    try:
        time.sleep(BASELINE_S)
        t_fault = time.monotonic()
        fault()
        restored_s = wait_until(restored, timeout_s, f"{name}: restored")
        time.sleep(SETTLE_S)
    finally:
        samples = load.stop()
    before = [s for s in samples if s.t1 < t_fault]
    during = between(samples, t_fault, t_fault + restored_s)
    slow_ms = 2 * (p(before, 99) or 0.0)
    abnormal = [s for s in samples if s.t1 >= t_fault and (not s.ok or s.ms > slow_ms)]
    row = {"fault": name, "sent": len(samples), "failed": sum(not s.ok for s in samples),
           "p50_before": p(before, 50) or 0.0, "p99_during": p(during, 99) or 0.0,
           "restored_s": restored_s,
           "normal_s": max((s.t1 for s in abnormal), default=t_fault) - t_fault,
           "errors": sorted({s.error for s in samples if not s.ok})}
    ROWS.append(row)
    print(f"\n{row}")
    return row, samples


def _kill_one(deployment: str) -> tuple[int, set[int]]:
    actors = replica_actors(deployment)
    victim = actors[0].pid
    os.kill(victim, signal.SIGKILL)
    return victim, {a.pid for a in actors}


def _replaced(watch, deployment: str, dead: int, want: int):
    def check() -> bool:
        pids = {a.pid for a in replica_actors(deployment)}
        return dead not in pids and len(pids) >= want and watch.running(deployment) >= want \
            and watch.healthy()
    return check


@pytest.mark.parametrize("deployment", ["ImageEncoder", "TextMask"])
def test_kill_a_model_replica(app_url, watch, deployment):
    want = len(replica_actors(deployment))
    killed: list[int] = []
    row, _ = run_under_load(app_url, f"kill -9 {deployment} replica",
                            lambda: killed.append(_kill_one(deployment)[0]),
                            lambda: _replaced(watch, deployment, killed[0], want)(), seed=21)
    assert row["failed"] == 0, row["errors"]


def test_kill_an_ingress_replica(app_url, watch):
    killed: list[int] = []
    before = {s["replica_id"] for s in all_stats("Ingress", 2).values()}
    row, samples = run_under_load(app_url, "kill -9 Ingress replica",
                                  lambda: killed.append(_kill_one("Ingress")[0]),
                                  lambda: _replaced(watch, "Ingress", killed[0], 2)(), seed=22)
    after = {s["replica_id"] for s in all_stats("Ingress", 2).values()}
    assert len(after - before) == 1  # one new Ingress replica took the dead one's place
    # The requests the dead Ingress was answering die with it: at most those in flight.
    assert row["failed"] <= CONCURRENCY, row["errors"]


def test_redis_stopped_and_started_again(app_url, watch, redis_srv):
    def stop_for_a_while() -> None:
        redis_srv.kill()
        time.sleep(5.0)
        redis_srv.start()

    def cache_back() -> bool:
        return httpx.get(f"{app_url}/healthz", timeout=5).json()["cache_ok"] is True

    row, _ = run_under_load(app_url, "Redis stopped 5 s, started again", stop_for_a_while,
                            cache_back, seed=23)
    assert row["failed"] == 0, row["errors"]
    with httpx.Client(timeout=30) as c:  # the cache works again, for new images too
        body = {"image": base64.b64encode(_png(99)).decode(), "points": [[60, 50]]}
        assert c.post(f"{app_url}/v1/segment", json=body).json()["cache"] == "miss"
        assert c.post(f"{app_url}/v1/segment", json=body).json()["cache"] == "hit"


def _png(seed: int) -> bytes:
    return png_bytes(scene(900_000 + seed))


def test_remove_a_worker_node(app_url, watch, cluster):
    # the node of the one PointDecoder: everything on it dies at once
    node_id = replica_actors("PointDecoder")[0].node_id
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    on_node = sorted(a.name.split("#")[1] for a in replica_actors()
                     if a.node_id == node_id)
    print(f"\nremoving node {node_id[:8]} with {on_node}")
    want = {"TextMask": 2, "PointDecoder": 1, "Selector": 1, "Ingress": 2}

    def remove_and_replace() -> None:
        cluster.remove_node(node, allow_graceful=False)
        add_worker(cluster)

    def back() -> bool:
        alive = replica_actors()
        return watch.healthy() and all(watch.running(d) >= n for d, n in want.items()) \
            and not any(a.node_id == node_id for a in alive)

    row, _ = run_under_load(app_url, f"remove worker node ({', '.join(on_node)})",
                            remove_and_replace, back, seed=24, timeout_s=180)
    assert row["failed"] == 0, row["errors"]

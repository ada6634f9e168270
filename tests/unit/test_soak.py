"""The soak's report (benchmarks/soak_report.py) on synthetic records and samples, the locustfile's
task mix, and (slow) one short real soak on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.soak_report import (
    build_report,
    cache_rates,
    checks,
    outcome,
    p99_stability,
    percentile,
    render,
    rss_growth,
    totals,
    window_s,
    windows,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_000_000.0


def _row(end_s: float, ms: float, status: int = 200, name: str = "segment click", **kw) -> dict:
    end = T0 + end_s
    return {"t": end - ms / 1000, "end": end, "name": name, "status": status, "ms": ms, **kw}


def _sample(t_s: float, rss: dict[str, float], pids: dict[str, int] | None = None) -> dict:
    pids = pids or {}
    return {"t": T0 + t_s, "replicas": {"Ingress": 1, "ImageEncoder": 1},
            "rss": [{"deployment": n.split("#")[0], "name": n, "pid": pids.get(n, 100),
                     "rss_mb": mb, "anon_mb": mb / 2} for n, mb in rss.items()],
            "redis_mb": 1.0}


def test_percentile_is_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, 50) == 50
    assert percentile(xs, 99) == 99
    assert percentile(xs, 100) == 100
    assert percentile(reversed(xs), 95) == 95
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 1000], 99) == 1000
    assert percentile([], 50) is None


def test_window_size_follows_the_run_length():
    assert window_s(600) == 60 and window_s(120) == 60
    assert window_s(119) == 15 and window_s(60) == 15
    assert window_s(59) == 10 and window_s(20) == 10


def test_a_503_is_backpressure_not_a_failure():
    assert outcome({"status": 200}) == "ok"
    assert outcome({"status": 201}) == "ok"
    assert outcome({"status": 503}) == "backpressure"
    for status in (0, 404, 422, 500, 502, 504):
        assert outcome({"status": status}) == "failure", status
    assert outcome({"status": 200, "error": "batch items failed with [500]"}) == "failure"

    rows = [_row(1, 10), _row(2, 10, 503), _row(3, 10, 404), _row(4, 10, 0),
            _row(5, 10, name="batch", items=[200, 503, 200])]
    tot = totals(rows)
    assert tot["requests"] == 5
    assert tot["by_status"] == {"0": 1, "200": 2, "404": 1, "503": 1}
    assert tot["failures"] == 2 and tot["deliberate_503"] == 1
    assert tot["batch_items"] == 3 and tot["batch_items_by_status"] == {"200": 2, "503": 1}


def test_windows_bin_by_completion_and_take_percentiles_of_2xx_only():
    rows = [_row(1 + i * 0.05, 10.0 + i) for i in range(100)]  # window 0: 10..109 ms
    rows += [_row(12, 5000.0, 503), _row(13, 9000.0, 500)]  # window 1: not in the percentiles
    rows += [_row(10 + i * 0.05, 20.0) for i in range(50)]
    rows.append(_row(10.5, 700.0))  # started in window 0 (t = 9.8 s), ends in window 1
    rows.append(_row(31, 40.0))  # after the 30 s run time: the tail
    wins = windows(rows, T0, seconds=30, width=10)
    assert [w["requests"] for w in wins] == [100, 53, 0, 1]
    assert [w["full"] for w in wins] == [True, True, True, False]
    w0, w1 = wins[0], wins[1]
    assert (w0["p50"], w0["p95"], w0["p99"], w0["max"]) == (59.0, 104.0, 108.0, 109.0)
    assert w1["p99"] == 700.0 and w1["p50"] == 20.0
    assert (w1["failures"], w1["deliberate_503"]) == (1, 1)
    assert wins[2]["p99"] is None
    assert w0["rps"] == pytest.approx(10.0)


def _wins(p99s: list[float | None], full: list[bool] | None = None) -> list[dict]:
    full = full or [True] * len(p99s)
    return [{"index": i, "p99": p, "full": f} for i, (p, f) in enumerate(zip(p99s, full, strict=True))]


def test_p99_ratio_is_last_full_window_over_the_first_after_warm_up():
    out = p99_stability(_wins([900.0, 100.0, 120.0, 140.0, 5000.0], [True] * 4 + [False]))
    assert (out["baseline_window"], out["last_window"]) == (1, 3)
    assert out["ratio"] == pytest.approx(1.4)
    assert out["ratio_vs_first_window"] == pytest.approx(140 / 900)
    assert p99_stability(_wins([100.0, 100.0, 160.0]))["ratio"] == pytest.approx(1.6)
    assert p99_stability(_wins([100.0, 100.0, None, None]))["ratio"] is None  # empty windows
    assert p99_stability(_wins([100.0, 200.0]))["ratio"] is None  # no two after warm-up


def test_rss_growth_from_the_first_sample_after_warm_up():
    samples = [_sample(-5, {"Ingress#a": 300.0, "ImageEncoder#b": 400.0}),  # idle
               _sample(5, {"Ingress#a": 350.0, "ImageEncoder#b": 480.0}),  # still warming up
               _sample(15, {"Ingress#a": 360.0, "ImageEncoder#b": 500.0}),  # start
               _sample(60, {"Ingress#a": 361.8, "ImageEncoder#b": 560.0})]  # end
    out = rss_growth(samples, start_t=T0 + 10)
    assert out["start_t"] == T0 + 15 and out["end_t"] == T0 + 60
    reps = {r["name"]: r for r in out["replicas"]}
    assert reps["Ingress#a"]["growth_pct"] == pytest.approx(0.5)
    assert reps["ImageEncoder#b"]["growth_pct"] == pytest.approx(12.0)
    assert reps["ImageEncoder#b"]["idle_mb"] == 400.0 and reps["ImageEncoder#b"]["max_mb"] == 560.0
    # a replica restarted in between (a new pid under the same name) has no growth to judge
    moved = rss_growth(samples[:3] + [_sample(60, {"Ingress#a": 300.0}, {"Ingress#a": 7})],
                       start_t=T0 + 10)
    assert moved["replicas"][0]["growth_pct"] is None
    assert moved["gone"] == ["ImageEncoder#b"]


def test_checks_pass_and_fail_against_the_targets():
    ok_tot = totals([_row(1, 10), _row(2, 10, 503)])
    p99_ok, p99_bad = {"ratio": 1.49}, {"ratio": 1.51}
    rss_ok = {"replicas": [{"growth_pct": 9.9}, {"growth_pct": -2.0}]}
    rss_bad = {"replicas": [{"growth_pct": 1.0}, {"growth_pct": 10.0}]}
    assert [c["pass"] for c in checks(ok_tot, p99_ok, rss_ok)] == [True, True, True]
    assert [c["pass"] for c in checks(ok_tot, p99_bad, rss_bad)] == [True, False, False]
    assert checks(ok_tot, {"ratio": None}, {"replicas": []})[1]["pass"] is None
    failed = totals([_row(1, 10), _row(2, 10, 500)])
    assert checks(failed, p99_ok, rss_ok)[0]["value"] == 1
    assert checks(failed, p99_ok, rss_ok)[0]["pass"] is False
    item_failed = totals([_row(1, 10, name="batch", items=[200, 500])])
    assert checks(item_failed, p99_ok, rss_ok)[0]["pass"] is False
    assert checks(totals([]), p99_ok, rss_ok)[0]["pass"] is False  # no traffic is no pass


def test_cache_rates_count_a_failed_warm_request_as_a_miss():
    rows = [_row(1, 10, name="segment cold", cache="miss"),
            _row(2, 10, cache="hit"), _row(3, 10, cache="hit"),
            _row(4, 10, 404),  # an evicted image_id
            _row(5, 10, 503),  # backpressure: not asked of the cache at all
            _row(6, 10, name="batch", cache=["miss", "miss", "hit", None]),
            _row(7, 10, name="embed", cache="miss")]
    out = cache_rates(rows)
    assert out["warm_requests"] == 3 and out["warm_hit_rate"] == pytest.approx(2 / 3)
    assert out["answered"] == 6 and out["embedding_hit_rate"] == pytest.approx(3 / 6)


def test_report_end_to_end_and_its_markdown():
    rows = [_row(0.5 + i * 0.1, 50.0 + (i % 10), cache="hit", text_cache="hit")
            for i in range(400)]
    rows += [_row(20, 4000.0)] * 3  # slow outliers in window 1 (of 10 s windows)
    samples = [_sample(-2, {"Ingress#a": 300.0}), _sample(12, {"Ingress#a": 320.0}),
               _sample(41, {"Ingress#a": 330.0})]
    config = {"users": 4, "seconds": 40, "profile": "configs/models/demo.yaml", "wait_s": "0.5,2",
              "seed": 1, "window_s": 10, "sample_s": 10.0, "app_startup_s": 9.0, "locust": "x",
              "machine": {"date": "today", "commit": "abc", "cpu": "cpu", "cores": 2,
                          "memory_gib": 8.0}}
    rep = build_report(rows, samples, config)
    assert rep["totals"]["requests"] == 403
    assert rep["p99"]["baseline_window"] == 1 and rep["p99"]["last_window"] == 3
    assert rep["p99"]["ratio"] < 0.1  # the outlier sits in the baseline window
    assert rep["rss"]["replicas"][0]["growth_pct"] == pytest.approx(100 * 10 / 320)
    assert [c["pass"] for c in rep["checks"]] == [True, True, True] and rep["passed"]
    shifted = build_report(rows, samples, config, t0=T0 - 10)["windows"]  # locust's spawn time
    assert len(shifted) == 6 and shifted[0]["requests"] == 0
    cut = build_report(rows, samples, {**config, "run_s": 25.0})  # locust stopped them early
    assert [w["full"] for w in cut["windows"]] == [True, True, False, False]
    assert cut["p99"]["ratio"] is None
    md = render(json.loads(json.dumps(rep)))
    assert "**PASS**" in md and "**FAIL**" not in md and "| 1 | 10-20 | yes |" in md

    rows += [_row(35, 9000.0)] * 3  # now the last window is the slow one
    rep = build_report(rows, samples, config)
    assert rep["p99"]["ratio"] > 1.5 and not rep["passed"]
    assert "**FAIL** p99" in render(rep)


def test_locustfile_has_the_weighted_tasks():
    # NOTE: in a subprocess: importing locust monkey-patches this process with gevent.
    code = ("import collections, json; from benchmarks.locustfile import SegmentUser as U; "
            "print(json.dumps(collections.Counter(t.__name__ for t in U.tasks)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    weights = json.loads(out.stdout.strip().splitlines()[-1])
    assert weights == {"cold": 2, "click": 6, "repeat_text": 2, "new_text": 2, "resend": 1,
                       "batch": 1, "embed": 1}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_short_soak_on_the_tiny_model(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "20", "--users", "2",
         "--profile", "configs/models/tiny.yaml", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert (tmp_path / "report.md").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["requests"] > 0
    assert report["totals"]["failures"] == 0, report["totals"]
    assert report["checks"][0]["pass"] is True
    assert {r["deployment"] for r in report["rss"]["replicas"]} == {
        "Ingress", "ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask", "Selector"}
    print(f"soak smoke: {time.perf_counter() - t:.1f} s, exit {proc.returncode}")


class _FakeApp:
    """An HTTP server in a thread that answers like the app: /v1/segment 200, /v1/embed 503 with
    Retry-After, /v1/segment/batch 200 with one item failed (500)."""

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                one = {"image_id": "0" * 64, "cache": "hit", "text_cache": "miss"}
                status, headers, body = 200, {}, one
                if self.path == "/v1/embed":
                    status, headers, body = 503, {"Retry-After": "0"}, {"error": {}}
                elif self.path == "/v1/segment/batch":
                    body = {"results": [{"status": 200, "result": one},
                                        {"status": 500, "result": None, "error": {}}]}
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_locust_records_503_apart_and_fails_a_batch_with_a_failed_item(tmp_path):
    from benchmarks.soak import locust_command

    records = tmp_path / "requests.jsonl"
    env = {**os.environ, "SOAK_RECORDS": str(records), "SOAK_WAIT": "0.01,0.02"}
    with _FakeApp() as url:
        cmd = locust_command(url, users=2, seconds=8, out=tmp_path)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    marks = {r["event"]: r["t"] for r in rows if "event" in r}
    assert marks["test_stopping"] - marks["test_start"] == pytest.approx(8, abs=0.5)  # run time
    by_name: dict[str, list[dict]] = {}
    for r in (r for r in rows if "event" not in r):
        by_name.setdefault(r["name"], []).append(r)
    assert {r["status"] for r in by_name["embed"]} == {503}
    assert all(outcome(r) == "backpressure" for r in by_name["embed"])
    assert all(r["items"] == [200, 500] and outcome(r) == "failure" for r in by_name["batch"])
    assert all(r["cache"] == "hit" and outcome(r) == "ok" for r in by_name["segment cold"])
    stats = (tmp_path / "locust_stats.csv").read_text()
    assert "embed [503]" in stats  # locust counts backpressure under its own name, not failed
    row = next(line for line in stats.splitlines() if line.startswith("POST,embed [503],"))
    assert row.split(",")[3] == "0"  # its failure count

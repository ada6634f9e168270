"""`make soak`: a bounded locust soak against a local app, and a report of what held steady.

    .venv/bin/python -m benchmarks.soak [--seconds 600] [--users 8] [--profile P] [--out out/soak]

It starts a redis-server of its own on a free port (the tests' RedisServer, imported rather than
copied: the shipped configs/redis/local.conf, never the machine's 6379), the app in this process
(serving.launch.start_app: local Ray and Serve), then locust headless as a subprocess
(benchmarks/locustfile.py; its gevent patching stays out of this Ray driver). While locust runs,
every SAMPLE_S it records the RUNNING replicas per deployment (serve.status()), each replica
process's VmRSS (from /proc, found in Ray's actor table) and Redis's used memory. Then it stops
the app and Redis and writes report.md and report.json beside locust's CSVs and the per-request
records (requests.jsonl). Exit status 0 iff every target below holds.

Targets: no answers other than 2xx and deliberate 503s (batch items included); the last full
window's p99 within 1.5x that of the first window after warm-up; every replica's RSS growth from
warm-up's end to the end under 10%. Windows are 60 s, or 15 s for runs under 2 minutes (10 s under
one); the first window is warm-up: its requests count in every total, but it is neither the p99
baseline nor the RSS start, since first requests legitimately fill caches and allocate buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.soak_report import build_report, render, window_s

REPO = Path(__file__).resolve().parent.parent
APP = "soak"
SAMPLE_S = 10.0
STOP_TIMEOUT_S = 30  # locust lets each user finish its task after the run time
DEPLOYMENTS = ("Ingress", "ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask",
               "Selector")

# --- the run ------------------------------------------------------------------------------------


def sample(redis_client=None) -> dict:
    """RUNNING replicas per deployment, each replica's VmRSS / RssAnon, Redis's used memory."""
    from ray import serve

    from benchmarks.memory import proc_status_mb, replica_actors

    deps = serve.status().applications[APP].deployments
    counts = {d: sum(v for k, v in deps[d].replica_states.items()
                     if getattr(k, "value", k) == "RUNNING") for d in DEPLOYMENTS if d in deps}
    rss = []
    for dep, actors in sorted(replica_actors(APP).items()):
        for a in actors:
            st = proc_status_mb(a["pid"])
            rss.append({"deployment": dep, "name": a["name"], "pid": a["pid"],
                        "rss_mb": st["vmrss_mb"], "anon_mb": st["rssanon_mb"]})
    used = None
    if redis_client is not None:
        try:
            used = redis_client.info("memory")["used_memory"] / 2**20
        except Exception:  # noqa: BLE001 - a missing number, not a failed soak
            pass
    return {"t": time.time(), "replicas": counts, "rss": rss, "redis_mb": used}


def locust_command(url: str, users: int, seconds: int, out: Path) -> list[str]:
    """Headless, all users spawned in the first second, CSVs to out/locust_*.csv; locust's own
    exit code is left out of it (the report judges failures, and a 503 is not one)."""
    beside = Path(sys.executable).with_name("locust")
    return [str(beside) if beside.is_file() else "locust",
            "-f", str(REPO / "benchmarks/locustfile.py"), "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url,
            "--only-summary", "--csv", str(out / "locust"), "--stop-timeout", str(STOP_TIMEOUT_S),
            "--exit-code-on-error", "0", "--loglevel", "WARNING"]


def soak(seconds: int, users: int, profile: Path, out: Path, wait: str, seed: int) -> dict:
    from serving.launch import start_app, stop_app
    from tests.support.redis_server import RedisServer

    out.mkdir(parents=True, exist_ok=True)
    records = out / "requests.jsonl"
    records.write_text("")
    env = {**os.environ, "SOAK_RECORDS": str(records), "SOAK_SEED": str(seed), "SOAK_WAIT": wait,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    samples: list[dict] = []
    with RedisServer(maxmemory="1gb") as redis:
        try:
            url, up_s = start_app(profile, redis.url, name=APP)
            print(f"[soak] app up at {url} in {up_s:.1f} s; locust: {users} users for "
                  f"{seconds} s", flush=True)
            client = redis.client()
            samples.append(sample(client))  # idle: before any traffic
            cpu0 = _children_cpu_s()
            with open(out / "locust.log", "w") as log:
                proc = subprocess.Popen(locust_command(url, users, seconds, out), cwd=REPO,
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
                deadline = time.monotonic() + seconds + STOP_TIMEOUT_S + 120
                while proc.poll() is None:
                    try:
                        proc.wait(timeout=SAMPLE_S)
                    except subprocess.TimeoutExpired:
                        samples.append(sample(client))
                        if time.monotonic() > deadline:
                            proc.kill()
            locust_cpu_s = _children_cpu_s() - cpu0  # locust was the one child reaped meanwhile
            samples.append(sample(client))  # end: after the last request, app still up
        finally:
            import ray

            if ray.is_initialized():  # else serve.shutdown() would start a Ray to connect to
                stop_app()
    if proc.returncode:
        print(f"[soak] locust exited with {proc.returncode}: see {out / 'locust.log'}")
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    marks = {r["event"]: r["t"] for r in rows if "event" in r}  # the first of each
    rows = [r for r in rows if "event" not in r]
    t0 = marks.get("test_start")
    from benchmarks import machine

    facts = machine.facts()
    config = {"users": users, "seconds": seconds, "profile": str(profile), "wait_s": wait,
              "seed": seed, "window_s": window_s(seconds), "sample_s": SAMPLE_S,
              "app_startup_s": up_s, "locust_exit": proc.returncode,
              "locust_cpu_s": locust_cpu_s,
              "run_s": marks["test_stopping"] - t0 if t0 and "test_stopping" in marks else None,
              "locust": _version("locust"),
              "machine": {k: facts[k] for k in ("date", "commit", "cpu", "cores", "memory_gib")}}
    return build_report(rows, samples, config, t0=t0)


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_S", "600")))
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--profile", default=str(REPO / "configs/models/demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "out/soak"))
    ap.add_argument("--wait", default="0.5,2", help="each user's think time, 'lo,hi' seconds")
    ap.add_argument("--seed", type=int, default=None, help="scene seed (default: fresh)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**20)
    out = Path(args.out)
    report = soak(args.seconds, args.users, Path(args.profile), out, args.wait, seed)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report))
    for c in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]
        value = f"{c['value']:.2f}" if isinstance(c["value"], float) else c["value"]
        value = "-" if value is None else value
        print(f"[soak] {verdict}  {c['name']}: {value} (target {c['target']})")
    print(f"[soak] report: {out / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

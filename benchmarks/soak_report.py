"""The soak's report: what benchmarks.soak measured, reduced to windows, percentiles, cache hit
rates, RSS growth and PASS / FAIL lines (report.json), and rendered as report.md. Plain Python on
the records and samples; no Ray, no locust.

Records (one per request, from benchmarks/locustfile.py): t and end (epoch s), name, status, ms,
cache and text_cache ("hit" / "miss" / None; lists for a batch), items (a batch's per-item
statuses), error. Samples (one per SAMPLE_S, from benchmarks.soak): t, replicas (RUNNING per
deployment), rss ([{deployment, name, pid, rss_mb, anon_mb}]), redis_mb.
"""

from __future__ import annotations

import math
from collections import Counter

TARGETS = {"failures": 0, "p99_ratio": 1.5, "rss_growth_pct": 10.0}
WARM_KINDS = ("segment click", "segment repeat_text", "segment new_text", "segment resend")


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): the smallest value with q% of them at or below."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def window_s(seconds: float) -> int:
    return 60 if seconds >= 120 else 15 if seconds >= 60 else 10


def outcome(row: dict) -> str:
    """"ok", "backpressure" (a deliberate 503) or "failure" (anything else, a 2xx whose reply
    was wrong or a batch with an item that failed other than by 503 included)."""
    if row["status"] == 503:
        return "backpressure"
    if 200 <= row["status"] < 300 and not row.get("error"):
        return "ok"
    return "failure"


def totals(rows: list[dict]) -> dict:
    items = [s for r in rows for s in r.get("items") or ()]
    return {"requests": len(rows),
            "by_status": dict(sorted(Counter(str(r["status"]) for r in rows).items())),
            "failures": sum(outcome(r) == "failure" for r in rows),
            "deliberate_503": sum(outcome(r) == "backpressure" for r in rows),
            "batch_items": len(items),
            "batch_items_by_status": dict(sorted(Counter(str(s) for s in items).items()))}


def windows(rows: list[dict], t0: float, seconds: float, width: float) -> list[dict]:
    """Per window of `width` s from t0, by completion time (a request cut off by the end of the
    run is never missing from a full window): counts and latency percentiles of the 2xx."""
    n = max(1, math.ceil((max(r["end"] for r in rows) - t0) / width)) if rows else 0
    bins: list[list[dict]] = [[] for _ in range(n)]
    for r in rows:
        bins[min(n - 1, max(0, int((r["end"] - t0) // width)))].append(r)
    out = []
    for k, b in enumerate(bins):
        ms = [r["ms"] for r in b if outcome(r) == "ok"]
        out.append({"index": k, "start_s": k * width, "end_s": (k + 1) * width,
                    "full": (k + 1) * width <= seconds + 1e-6, "requests": len(b),
                    "rps": len(b) / width, "p50": percentile(ms, 50), "p95": percentile(ms, 95),
                    "p99": percentile(ms, 99), "max": max(ms, default=None),
                    "failures": sum(outcome(r) == "failure" for r in b),
                    "deliberate_503": sum(outcome(r) == "backpressure" for r in b)})
    return out


def p99_stability(wins: list[dict], warmup: int = 1) -> dict:
    """Last full window's p99 over the first full one after `warmup` windows (and, for reading,
    over the very first window). ratio None when there are not two such windows."""
    full = [w for w in wins if w["full"] and w["p99"] is not None]
    after = [w for w in full if w["index"] >= warmup]
    out = {"baseline_window": None, "last_window": None, "baseline_p99": None, "last_p99": None,
           "ratio": None, "ratio_vs_first_window": None}
    if len(after) >= 2:
        base, last = after[0], after[-1]
        out.update(baseline_window=base["index"], last_window=last["index"],
                   baseline_p99=base["p99"], last_p99=last["p99"],
                   ratio=last["p99"] / base["p99"])
        if full[0]["index"] == 0:
            out["ratio_vs_first_window"] = last["p99"] / full[0]["p99"]
    return out


def rss_growth(samples: list[dict], start_t: float) -> dict:
    """Per replica: VmRSS at idle (before traffic), at start (the first sample at or after
    start_t) and at the end (the last sample), and growth start -> end in %."""
    if not samples:
        return {"start_t": None, "end_t": None, "replicas": []}
    later = [s for s in samples if s["t"] >= start_t]
    start, end, idle = (later[0] if later else samples[-1]), samples[-1], samples[0]

    def by_name(s: dict) -> dict:
        return {r["name"]: r for r in s["rss"]}

    at_idle, at_start = by_name(idle), by_name(start)
    reps = []
    for name, r in by_name(end).items():
        first = at_start.get(name)
        growth = None
        if first and first["pid"] == r["pid"] and first["rss_mb"]:
            growth = (r["rss_mb"] - first["rss_mb"]) / first["rss_mb"] * 100
        reps.append({"deployment": r["deployment"], "name": name, "pid": r["pid"],
                     "idle_mb": (at_idle.get(name) or {}).get("rss_mb"),
                     "start_mb": first["rss_mb"] if first else None, "end_mb": r["rss_mb"],
                     "max_mb": max((s2["rss_mb"] for s in samples for s2 in s["rss"]
                                    if s2["name"] == name), default=None),
                     "growth_pct": growth})
    gone = sorted(set(at_start) - set(by_name(end)))
    return {"start_t": start["t"], "end_t": end["t"], "replicas": reps, "gone": gone}


def _hits(states) -> tuple[int, int]:
    states = [s for s in states if s is not None]
    return sum(s == "hit" for s in states), len(states)


def cache_rates(rows: list[dict]) -> dict:
    """Embedding hit rates: over every answered segment (batch items included), and over the
    requests on images this user had sent (a failed warm request counts as a miss)."""
    every = [c for r in rows if r["name"] != "embed" for c in _as_list(r.get("cache"))]
    warm = [r.get("cache") if outcome(r) == "ok" else "miss"
            for r in rows if r["name"] in WARM_KINDS and outcome(r) != "backpressure"]
    (h, n), (wh, wn) = _hits(every), _hits(warm)
    return {"embedding_hit_rate": h / n if n else None, "answered": n,
            "warm_hit_rate": wh / wn if wn else None, "warm_requests": wn}


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def kinds(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["name"] for r in rows}):
        b = [r for r in rows if r["name"] == name]
        ms = [r["ms"] for r in b if outcome(r) == "ok"]
        (h, n), (th, tn) = (_hits(c for r in b for c in _as_list(r.get(k)))
                            for k in ("cache", "text_cache"))
        out[name] = {"requests": len(b), "ok": len(ms), "p50": percentile(ms, 50),
                     "p95": percentile(ms, 95), "p99": percentile(ms, 99),
                     "embedding_hit_rate": h / n if n else None,
                     "text_hit_rate": th / tn if tn else None}
    return out


def checks(tot: dict, p99: dict, rss: dict) -> list[dict]:
    """PASS / FAIL (None: could not be judged, e.g. too short a run) against TARGETS."""
    item_fail = sum(v for s, v in tot["batch_items_by_status"].items()
                    if not (s.startswith("2") or s == "503"))
    growth = [r["growth_pct"] for r in rss["replicas"] if r["growth_pct"] is not None]
    return [
        {"name": "answers other than 2xx and deliberate 503 (batch items included)",
         "target": "0", "value": tot["failures"] + item_fail,
         "pass": tot["requests"] > 0 and tot["failures"] + item_fail <= TARGETS["failures"]},
        {"name": "p99, last full window / first after warm-up", "target": "<= 1.5",
         "value": p99["ratio"],
         "pass": None if p99["ratio"] is None else p99["ratio"] <= TARGETS["p99_ratio"]},
        {"name": "largest replica RSS growth, end of warm-up -> end (%)", "target": "< 10",
         "value": max(growth, default=None),
         "pass": None if not growth else max(growth) < TARGETS["rss_growth_pct"]},
    ]


def build_report(rows: list[dict], samples: list[dict], config: dict,
                 t0: float | None = None) -> dict:
    """Everything report.json holds. t0: when locust began to spawn users; default: the first
    request's start. Windows are full up to config["run_s"] (when locust told its users to stop,
    as measured) or else config["seconds"]."""
    rows = sorted(rows, key=lambda r: r["end"])
    width, seconds = config["window_s"], config.get("run_s") or config["seconds"]
    if t0 is None:
        t0 = min((r["t"] for r in rows), default=samples[0]["t"] if samples else 0.0)
    tot, wins = totals(rows), windows(rows, t0, seconds, width)
    p99 = p99_stability(wins)
    rss = rss_growth(samples, t0 + width)
    rss["start_s"] = None if rss["start_t"] is None else rss["start_t"] - t0
    timeline = [{"t_s": round(s["t"] - t0, 1), **s["replicas"]} for s in samples]
    rss["timeline"] = [{"t_s": round(s["t"] - t0, 1),
                        **{f"{x['deployment']} {x['pid']}": x["rss_mb"] for x in s["rss"]}}
                       for s in samples]
    redis_mb = [{"t_s": round(s["t"] - t0, 1), "used_mb": s.get("redis_mb")} for s in samples]
    result = checks(tot, p99, rss)
    return {"config": config, "totals": tot, "windows": wins, "p99": p99, "kinds": kinds(rows),
            "cache": cache_rates(rows), "replicas": timeline, "rss": rss, "redis": redis_mb,
            "checks": result, "passed": all(c["pass"] is not False for c in result)}


# --- report.md ----------------------------------------------------------------------------------


def _f(x, digits: int = 1, suffix: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{suffix}" if isinstance(x, float) else f"{x:,}{suffix}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _changes(timeline: list[dict]) -> list[dict]:
    """The replica timeline's first row, every row whose counts differ from the one before, and
    the last row."""
    out = []
    for i, row in enumerate(timeline):
        counts = {k: v for k, v in row.items() if k != "t_s"}
        if not out or counts != {k: v for k, v in out[-1].items() if k != "t_s"} \
                or i == len(timeline) - 1:
            out.append(row)
    return out


def render(r: dict) -> str:
    c, tot, p99, rss, cache = r["config"], r["totals"], r["p99"], r["rss"], r["cache"]
    m, w = c["machine"], c["window_s"]
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = [
        f"# Soak: {c['users']} users for {c['seconds']} s ({c['profile'].rsplit('/', 1)[-1]})", "",
        f"{m['date']}, commit {m['commit']}; {m['cpu']}, {m['cores']} cores, "
        f"{_f(m['memory_gib'])} GiB. locust {c['locust']} (headless, FastHttpUser), think time "
        f"{c['wait_s']} s, scene seed {c['seed']}; app started in {_f(c['app_startup_s'])} s; "
        f"replicas sampled every {_f(c['sample_s'], 0)} s. The load generator itself used "
        f"{_f(c.get('locust_cpu_s'))} s of CPU.", "",
        "## Verdict", "",
        *[f"- **{verdict[k['pass']]}** {k['name']}: {_f(k['value'], 2)} (target {k['target']})"
          for k in r["checks"]],
        "", f"Overall: **{'PASS' if r['passed'] else 'FAIL'}**"
        + (" (n/a: too short a run to judge; it does not fail the run)."
           if any(k["pass"] is None for k in r["checks"]) else "."), "",
        "## Totals", "",
        f"{tot['requests']:,} requests; by status {tot['by_status']}; failures {tot['failures']}; "
        f"deliberate 503 (backpressure, Retry-After honoured) {tot['deliberate_503']}. Batch "
        f"items: {tot['batch_items']:,}, by status {tot['batch_items_by_status']}.", "",
        f"## Per window ({w} s)", "",
        f"Windows by completion time from when locust began to spawn users. Window 0 is warm-up "
        "(in every total, but neither the p99 baseline nor the RSS start); a window past the run "
        f"time ({_f(c.get('run_s') or c['seconds'])} s, as measured) is the tail of users "
        "finishing their last task. Latencies: 2xx only; the p99 of a window with fewer than 100 "
        "requests is its slowest one.",
        "", "| window | s | full | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | "
        "failures | 503 |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["windows"]:
        lines.append(f"| {x['index']} | {x['start_s']:g}-{x['end_s']:g} | "
                     f"{'yes' if x['full'] else 'no'} | {x['requests']} | {_f(x['rps'])} | "
                     f"{_f(x['p50'])} | {_f(x['p95'])} | {_f(x['p99'])} | {_f(x['max'])} | "
                     f"{x['failures']} | {x['deliberate_503']} |")
    if p99["ratio"] is None:
        stability = "p99 stability: n/a (it needs two full windows after the warm-up window)."
    else:
        stability = (f"p99 stability: window {p99['last_window']} (last full) "
                     f"{_f(p99['last_p99'])} ms / window {p99['baseline_window']} (first after "
                     f"warm-up) {_f(p99['baseline_p99'])} ms = **{_f(p99['ratio'], 2)}** (target "
                     f"<= 1.5); against window 0 itself: {_f(p99['ratio_vs_first_window'], 2)}.")
    lines += ["", stability, "",
              "## By kind", "",
              "| request | n | ok | p50 ms | p95 ms | p99 ms | embedding hits | text-mask hits |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, k in r["kinds"].items():
        lines.append(f"| {name} | {k['requests']} | {k['ok']} | {_f(k['p50'])} | {_f(k['p95'])} | "
                     f"{_f(k['p99'])} | {_pct(k['embedding_hit_rate'])} | "
                     f"{_pct(k['text_hit_rate'])} |")
    lines += ["", "## Embedding cache", "",
              f"Hit rate over every answered segment (batch items included): "
              f"**{_pct(cache['embedding_hit_rate'])}** of {cache['answered']:,}. Over requests "
              f"on images the user had already sent ({', '.join(WARM_KINDS)}; a failed one "
              f"counts as a miss): **{_pct(cache['warm_hit_rate'])}** of "
              f"{cache['warm_requests']:,}.", "",
              "## Replicas over time (RUNNING; rows where the counts changed)", ""]
    deps = [k for k in (r["replicas"][0] if r["replicas"] else {}) if k != "t_s"]
    lines += ["| t (s) | " + " | ".join(deps) + " |", "|---:|" + "---:|" * len(deps)]
    lines += [f"| {x['t_s']:g} | " + " | ".join(str(x.get(d, "-")) for d in deps) + " |"
              for x in _changes(r["replicas"])]
    lines += ["", "## Replica RSS (VmRSS, MB)", "",
              f"idle: before any traffic; start: the first sample after warm-up "
              f"(t = {_f(rss.get('start_s'))} s); end: after locust "
              "exited, the app still up. Growth is start -> end: what the first requests allocate "
              "(caches, buffers, lazily built state) is legitimate and left out; what grows "
              "after is what a leak looks like.", "",
              "| deployment | replica pid | idle | start | end | max | growth |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for x in sorted(rss["replicas"], key=lambda x: (x["deployment"], x["name"])):
        lines.append(f"| {x['deployment']} | {x['pid']} | {_f(x['idle_mb'])} | "
                     f"{_f(x['start_mb'])} | {_f(x['end_mb'])} | {_f(x['max_mb'])} | "
                     f"{_f(x['growth_pct'], 2, '%')} |")
    series = rss.get("timeline") or []
    if series:
        step = max(1, math.ceil(len(series) / 12))
        keep = series[::step] + ([series[-1]] if (len(series) - 1) % step else [])
        cols = sorted({k for x in series for k in x if k != "t_s"})
        lines += ["", "RSS over time (MB; every sample up to 12 rows, evenly thinned):", "",
                  "| t (s) | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        lines += [f"| {x['t_s']:g} | " + " | ".join(_f(x.get(k)) for k in cols) + " |"
                  for x in keep]
    if rss.get("gone"):
        lines += ["", f"Replicas gone before the end: {', '.join(rss['gone'])}."]
    used = [x["used_mb"] for x in r["redis"] if x["used_mb"] is not None]
    if used:
        lines += ["", f"Redis used memory: {used[0]:.1f} MB idle, {used[-1]:.1f} MB at the end."]
    return "\n".join(lines) + "\n"

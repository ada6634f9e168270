"""BENCHMARKS.md from the results `benchmarks.run` collected: every number comes from that run."""

from __future__ import annotations

TARGETS = {
    "cold_vs_naive": 0.55,
    "warm_vs_cold": 0.10,
    "overhead_ms": 15.0,
    "encoder_vs_limit": 1.5,
    "many_passes": 20,
    "pointdecoder_vs_whole": 0.35,
    "warm_click_bytes": 64 * 1024,
}
# Peak RSS (VmHWM) in MB measured before replicas loaded only their own role's weights, at vit_b
# scale, on this machine: every model replica then loaded the whole pipeline and freed the rest.
MEMORY_BASELINE_SCALE = "vit_b"
MEMORY_BASELINE_MB = {"whole pipeline": 1632, "ImageEncoder": 1720, "PointDecoder": 1720,
                      "TextMask": 1720, "Selector": 326, "Ingress": 339}
MEMORY_ORDER = ("ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask", "Selector",
                "Ingress")

SCENARIOS = [
    ("cold", "cold request (new image)"),
    ("warm", "warm request (encoded image, new click, new text)"),
    ("session", "20-click session, clicks 2-20 (by image_id)"),
    ("concurrency_1", "warm clicks on one image, HTTP concurrency 1"),
    ("concurrency_4", "warm clicks on one image, HTTP concurrency 4"),
    ("concurrency_8", "warm clicks on one image, HTTP concurrency 8"),
    ("concurrency_1_direct", "the same, concurrency 1, direct to the ingress replica"),
]
SCALES = {"demo": "demo model (ShapesRef, 256x256 images)",
          "vitb": "vit_b-shaped (SAM vit_b + BEiT-3 base, random weights, 640x480 images)"}


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _ms(stats: dict, key: str) -> str:
    return _f(stats.get(key)) if stats else "-"


def _overhead_parts(demo: dict) -> list[str]:
    """Where the demo-scale overhead goes (medians per part, warm, concurrency 1)."""
    lines = []
    for key, how in (("concurrency_1", "through the proxy"),
                     ("concurrency_1_direct", "direct ingress")):
        parts = demo.get(key, {}).get("overhead_parts_ms")
        if parts:
            lines.append(f"Overhead {how}, by part (medians, ms): "
                         + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts.items())
                         + ".")
    if lines:
        lines += ["(HTTP/proxy: client latency minus the Ingress's own total; Ingress: its total "
                  "minus the cache and its waits on the models and the Selector; hops: each "
                  "wait minus the compute the replica reports.)", ""]
    return lines


def ratios(r: dict) -> dict:
    served, naive, enc = r["served"], r["naive"], r["encoder"]
    vitb, demo = served["vitb"], served["demo"]
    cold = vitb["cold"]["latency_ms"]["median"]
    out = {
        "cold_vs_naive": cold / naive["vitb"]["latency_ms"]["median"],
        "warm_vs_cold": vitb["warm"]["latency_ms"]["median"] / cold,
        "overhead_ms": demo["concurrency_1"]["overhead_ms"]["median"],
        "overhead_direct_ms": (demo["concurrency_1_direct"]["overhead_ms"]["median"]
                               if "concurrency_1_direct" in demo else None),
        "encoder_vs_limit": enc["fast_over_limit"],
        "many_passes": {f"{scale} {how}": served[scale][f"many_{how}"]["encoder_passes"]
                        for scale in ("demo", "vitb") for how in ("sdk", "batch")
                        if f"many_{how}" in served[scale]},
        "demo_cold_vs_naive": demo["cold"]["latency_ms"]["median"]
        / naive["demo"]["latency_ms"]["median"],
    }
    if "bytes_moved" in vitb.get("text_cached", {}):
        out["warm_click_bytes"] = vitb["text_cached"]["bytes_moved"]["median"]
        out["session_bytes"] = vitb["session"]["bytes_moved"]["median"]
        out["cold_bytes"] = vitb["cold"]["bytes_moved"]["median"]
    return out


def _met(key: str, value) -> str:
    goal = TARGETS[key]
    if key == "many_passes":
        ok = all(v == goal for v in value.values())
    else:
        ok = value <= goal
    return "yes" if ok else "**no**"


def render(r: dict) -> str:
    m, enc, rat = r["machine"], r["encoder"], ratios(r)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench{'-quick' if r['mode'] == 'quick' else ''}` "
        f"(`python -m benchmarks.run{' --quick' if r['mode'] == 'quick' else ''}`) on "
        f"{m['date']}, commit `{m['commit']}`, in {r['seconds'] / 60:.1f} min. Scene seed "
        f"{r['seed']}; served runs used the cache: {r['cache']}. Every ratio below divides two "
        "numbers measured in this run, on this machine; rerun to compare another machine. "
        "Latencies are client-side wall times in ms.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores ({', '.join(m['simd']) or 'no AVX2'}) |",
        f"| caches | L2 {m['l2']}, L3 {m['l3']} |",
        f"| memory | {_f(m['memory_gib'])} GiB |",
        f"| torch threads (benchmark process) | {m['torch_threads']} |",
        f"| fp32 GEMM {enc['gemm_before']['n']}^3, best / median | "
        f"{_f(enc['gemm_before']['best_gflops'])} / {_f(enc['gemm_before']['median_gflops'])} "
        f"GFLOP/s before the encoder runs, {_f(enc['gemm_after']['best_gflops'])} / "
        f"{_f(enc['gemm_after']['median_gflops'])} after |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + " |",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---:|:-:|",
        f"| cold BiPrompt request / naive pipeline, vit_b scale | "
        f"{rat['cold_vs_naive']:.3f}x | <= {TARGETS['cold_vs_naive']}x | "
        f"{_met('cold_vs_naive', rat['cold_vs_naive'])} |",
        f"| warm request / cold request, vit_b scale | {rat['warm_vs_cold']:.3f}x | "
        f"<= {TARGETS['warm_vs_cold']}x | {_met('warm_vs_cold', rat['warm_vs_cold'])} |",
        f"| serving overhead p50, demo scale, concurrency 1, through Serve's HTTP proxy | "
        f"{rat['overhead_ms']:.1f} ms | <= {TARGETS['overhead_ms']:.0f} ms | "
        f"{_met('overhead_ms', rat['overhead_ms'])} |",
        *([f"| the same, direct to the ingress replica (Serve direct ingress) | "
           f"{rat['overhead_direct_ms']:.1f} ms | <= {TARGETS['overhead_ms']:.0f} ms | "
           f"{_met('overhead_ms', rat['overhead_direct_ms'])} |"]
          if rat["overhead_direct_ms"] is not None else []),
        f"| vit_b encoder (fast path) / matmul-bound limit | {rat['encoder_vs_limit']:.3f}x | "
        f"<= {TARGETS['encoder_vs_limit']}x | {_met('encoder_vs_limit', rat['encoder_vs_limit'])} "
        "|",
        "| 200 requests over 20 images: encoder passes | "
        + ", ".join(f"{k}: {v}" for k, v in rat["many_passes"].items())
        + f" | {TARGETS['many_passes']} | {_met('many_passes', rat['many_passes'])} |",
        *([f"| bytes moved between replicas, warm click (a new point, its text mask cached), "
           f"vit_b scale: a 256x64x64 float16 embedding as ViT-H's, 640x480 image; p50 (session "
           f"clicks 2-20, some with a new text: {rat['session_bytes'] / 1024:,.1f} KB; cold: "
           f"{rat['cold_bytes'] / 1024:,.0f} KB) | {rat['warm_click_bytes'] / 1024:,.1f} KB | "
           f"<= {TARGETS['warm_click_bytes'] // 1024} KB | "
           f"{_met('warm_click_bytes', rat['warm_click_bytes'])} |"]
          if "warm_click_bytes" in rat else []),
        "",
        *_overhead_parts(r["served"]["demo"]),
        f"At demo scale a cold request costs {rat['demo_cold_vs_naive']:.2f}x the naive "
        "pipeline: there the models are so small that serving hops, not the encoder, dominate.",
        "",
        *_encoder_section(enc),
        *_naive_section(r["naive"]),
    ]
    lines += [
        "In the served tables, overhead is end-to-end latency minus the model compute the "
        "deployments report (encoder + the slower of point decoder and text model + selector): "
        "HTTP, Serve's hops, cache lookups, and at concurrency above 1 the time spent queueing. "
        "Clicks on one image repeat its few expressions, so their text masks mostly come from "
        "the cache; the warm row asks each image a new expression.",
        "",
    ]
    for scale, title in SCALES.items():
        lines += _served_section(r["served"][scale], title)
    if r.get("memory"):
        lines += memory_section(r["memory"])
    lines += _cost_section(r)
    return "\n".join(lines) + "\n"


def _encoder_section(enc: dict) -> list[str]:
    rows = []
    for label, key in (("reference (segment-anything)", "reference_s"), ("fast path (default)",
                                                                         "fast_s")):
        s = enc[key]
        rows.append(f"| {label} | {s['median']:.2f} | {s['p95']:.2f} | {s['min']:.2f} | "
                    f"{s['max']:.2f} | {s['n']} | {s['median'] / enc['limit_s']:.2f}x |")
    return [
        "## SAM vit_b image encoder, 1x3x1024x1024, fp32, random weights",
        "",
        "| forward | median s | p95 s | min s | max s | runs | / limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        f"| matmul-bound limit | {enc['limit_s']:.2f} | | | | | 1.00x |",
        "",
        f"The limit is the model's {enc['flops'] / 1e9:.0f} GFLOP (matmuls and convolutions of "
        f"the reference forward, counted by `FlopCounterMode`) over the best fp32 GEMM rate "
        f"measured in this run, {enc['gemm_gflops']:.0f} GFLOP/s. The fast path is "
        f"{enc['speedup']:.2f}x the reference and its embedding is within "
        f"{enc['max_abs_diff']:.1e} (max-abs) of the reference's; it skips the window padding "
        f"in `qkv`/`proj`, so it executes {enc['flops_fast_path'] / 1e9:.0f} GFLOP.",
        "",
    ]


def _naive_section(naive: dict) -> list[str]:
    lines = [
        "## Naive BiPrompt (no serving, no cache: two encoder passes per request)",
        "",
        "`SamPredictor.set_image` + `predict(multimask_output=True)`, EVF-SAM's own encoder pass "
        "and BEiT-3, numpy IoU selection; both encoders on segment-anything's reference "
        "forward, in this process with its torch threads.",
        "",
        "| scale | requests | median ms | p95 | min | max | SAM set_image | predict | "
        "EVF encoder | BEiT-3 + decoder | select |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scale in ("demo", "vitb"):
        n, s, st = naive[scale]["requests"], naive[scale]["latency_ms"], naive[scale]["stages_ms"]
        lines.append(
            f"| {scale} | {n} | {_ms(s, 'median')} | {_ms(s, 'p95')} | {_ms(s, 'min')} | "
            f"{_ms(s, 'max')} | {_f(st['sam_set_image'])} | {_f(st['sam_predict'])} | "
            f"{_f(st['evf_encoder'])} | {_f(st['evf_text'])} | {_f(st['select'], 2)} |")
    return lines + [""]


def _served_section(rows: dict, title: str) -> list[str]:
    lines = [
        f"## Served: {title}",
        "",
        f"Serve app up in {rows['startup_s']:.1f} s; torch threads per replica: "
        + ", ".join(f"{k} {v}" for k, v in rows["torch_threads"].items()) + ".",
        "",
        "| scenario | n | median ms | p95 | min | max | req/s | encoder passes | cache hits | "
        "text-mask hits | overhead p50 ms | model p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in SCENARIOS:
        row = rows.get(key)
        if not row:
            continue
        s = row["latency_ms"]
        lines.append(
            f"| {label} | {s['n']} | {_f(s['median'])} | {_f(s['p95'])} | {_f(s['min'])} | "
            f"{_f(s['max'])} | {_f(row['throughput_rps'])} | {row['encoder_passes']} | "
            f"{row['cache_hit_rate']:.0%} | {row.get('text_cache_hit_rate', 0):.0%} | "
            f"{_f(row['overhead_ms']['median'])} | "
            f"{_f(row['model_ms']['median'])} |")
    sess = rows["session"]
    lines += ["", f"Session: the first click (cold, with the image) took "
              f"{_f(sess['first_click_ms'])} ms; all {sess['clicks']} clicks "
              f"{sess['session_s']:.2f} s with {sess['encoder_passes']} encoder pass(es).", ""]
    many = [(k, lbl) for k, lbl in (("many_sdk", "SDK `segment_many` (concurrency 8)"),
                                    ("many_batch", "`/v1/segment/batch`, 4 posts of 50"))
            if k in rows]
    if many:
        lines += ["| 200 requests over 20 images | ok | seconds | req/s | encoder passes | "
                  "cache hits |", "|---|---:|---:|---:|---:|---:|"]
        for key, label in many:
            x = rows[key]
            lines.append(f"| {label} | {x['ok']} | {x['seconds']:.2f} | "
                         f"{_f(x['throughput_rps'])} | {x['encoder_passes']} | "
                         f"{x['cache_hit_rate']:.0%} |")
        lines.append("")
    return lines


def _cost_section(r: dict) -> list[str]:
    vitb = r["served"]["vitb"]
    cold = vitb["cold"]
    enc = r["encoder"]
    model = cold["model_ms"]["median"]
    total = cold["latency_ms"]["median"]
    return [
        "## Largest remaining cost",
        "",
        f"A cold vit_b-scale request: {total:,.0f} ms end to end, of which the deployments "
        f"report {model:,.0f} ms of model compute; the SAM encoder's pass alone is "
        f"{enc['fast_s']['median'] * 1000:,.0f} ms in-process ({enc['fast_over_limit']:.2f}x "
        f"its matmul-bound limit of {enc['limit_s'] * 1000:,.0f} ms). The encoder is the cost "
        "that remains: a warm request, which skips it, takes "
        f"{vitb['warm']['latency_ms']['median']:,.0f} ms.",
        "",
    ]


def _weights_text(weights: dict | None) -> str:
    if weights is None:
        return "not reported"
    held = {k: v for k, v in weights.items() if v}
    if not held:
        return "none"
    parts = ", ".join(f"{k} {_size_mb(v)}" for k, v in held.items())
    return f"{parts} ({_size_mb(sum(held.values()))} in all)"


def _size_mb(n_bytes: float) -> str:
    mb = n_bytes / 2**20
    if mb >= 10:
        return f"{mb:,.0f}"
    return f"{mb:.2f}" if mb >= 0.01 else "<0.01"


def _holds(row: dict, part: str) -> bool:
    return bool((row.get("weights") or {}).get(part))


def memory_targets(mem: dict) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for the memory section, judged from the numbers; a target
    whose evidence is missing (a replica that reported no weights) is not met."""
    rows = mem["replicas"]
    by_dep = {d: [x for x in rows if x["deployment"] == d] for d in MEMORY_ORDER}
    whole = mem["whole_pipeline"]["vmhwm_mb"]
    out = []

    decoders = [x["vmhwm_mb"] for x in by_dep["PointDecoder"] if x.get("vmhwm_mb") is not None]
    if decoders and whole:
        ratio = max(decoders) / whole
        measured = f"{ratio:.3f}x ({max(decoders):,.0f} / {whole:,.0f} MB)"
        ok = ratio <= TARGETS["pointdecoder_vs_whole"]
    else:
        measured, ok = "not measured", False
    out.append(("PointDecoder replica peak RSS / the whole pipeline's", measured,
                f"<= {TARGETS['pointdecoder_vs_whole']}x", ok))

    # NOTE: EVF-SAM's checkpoint has its own copy of SAM's image encoder: either copy counts.
    for dep, parts, label in (("TextMask", ("sam.image_encoder", "evf.image_encoder"),
                               "SAM's image encoder"),
                              ("ImageEncoder", ("evf.beit3",), "BEiT-3")):
        reps = by_dep[dep]
        reported = bool(reps) and all(x.get("weights") is not None for x in reps)
        held = sorted({p for x in reps for p in parts if _holds(x, p)})
        if not reported:
            measured = "no weights report" if reps else "no replica found"
        elif held:
            measured = ", ".join(
                f"holds {p} ({_size_mb(max((x['weights'].get(p) or 0) for x in reps))} MB)"
                for p in held)
        else:
            measured = "holds " + (", ".join(sorted({k for x in reps for k, v in
                                                     x["weights"].items() if v})) or "nothing")
        out.append((f"{dep} replica holds {label}", measured, "never", reported and not held))

    light = by_dep["Selector"] + by_dep["Ingress"]
    reported = bool(by_dep["Selector"]) and bool(by_dep["Ingress"]) and all(
        x.get("weights") is not None for x in light)
    measured = "; ".join(f"{x['deployment']}: {_weights_text(x.get('weights'))}" for x in light)
    ok = reported and not any(v for x in light for v in x["weights"].values())
    out.append(("Selector and Ingress hold model weights", measured or "no replica found",
                "none", ok))
    return out


def memory_section(mem: dict) -> list[str]:
    """'Per-replica memory (vit_b scale)': every replica after one cold request, the whole
    pipeline in one process, the baseline, and the targets."""
    rows = sorted(mem["replicas"], key=lambda x: (MEMORY_ORDER.index(x["deployment"])
                                                 if x["deployment"] in MEMORY_ORDER else 99,
                                                 x["pid"]))
    whole = mem["whole_pipeline"]
    cuda = any(x.get("cuda_max_allocated_mb") is not None for x in [*rows, whole])
    head = ("| process | pid | peak RSS MB | steady RSS MB | of which anon / file | ready s | "
            "weights held (MB) |")
    rule = "|---|---:|---:|---:|---:|---:|---|"
    if cuda:
        head, rule = head + " CUDA max allocated MB |", rule + "---:|"
    scale = mem.get("scale", MEMORY_BASELINE_SCALE)
    baseline = scale == MEMORY_BASELINE_SCALE  # measured at that scale only
    if baseline:
        head, rule = head + " peak RSS MB before |", rule + "---:|"

    def line(name: str, x: dict, key: str) -> str:
        split = (f"{_f(x.get('rssanon_mb'), 0)} / {_f(x.get('rssfile_mb'), 0)}"
                 if x.get("rssanon_mb") is not None else "-")
        cells = [name, str(x.get("pid", "-")), _f(x.get("vmhwm_mb"), 0), _f(x.get("vmrss_mb"), 0),
                 split, _f(x.get("ready_s")), _weights_text(x.get("weights"))]
        if cuda:
            cells.append(_f(x.get("cuda_max_allocated_mb"), 0))
        if baseline:
            cells.append(_f(MEMORY_BASELINE_MB.get(key)))
        return "| " + " | ".join(cells) + " |"

    from_proc = sorted({x["deployment"] for x in rows if x["source"] != "stats"})
    how = "its own `stats()`" if not from_proc else (
        "its own `stats()`, except " + ", ".join(from_proc) + ": /proc/<pid>/status read from "
        "the driver (that deployment's `stats()` did not report its process)")
    lines = [
        f"## Per-replica memory ({scale} scale)",
        "",
        f"One cold request (a new {mem['image_size'][1]}x{mem['image_size'][0]} image, one point "
        f"and one text) went through every role of the served app (up in "
        f"{mem['startup_s']:.1f} s; the request took {mem['request_ms']:,.0f} ms); then every "
        "replica was read: peak RSS (VmHWM), steady RSS (VmRSS), seconds from its process start "
        f"to the end of its constructor, and the parameters it reports holding, read through "
        f"{how}. The whole pipeline ran in one fresh process: `BiPromptPipeline.from_config`, "
        f"one image embedded, one point + text segmented ({whole['request_ms']:,.0f} ms), then "
        "its own /proc/self/status; its ready s is process start to the pipeline loaded. Steady "
        "RSS splits into anonymous memory and file-backed pages (RssAnon / RssFile: a "
        "memory-mapped checkpoint's pages count there once touched)."
        + (" The last column is the peak RSS measured before each replica loaded only its own "
           "role's weights (every model replica then loaded the whole pipeline and freed the "
           "rest)." if baseline else ""),
        "",
        head,
        rule,
        *[line(x["deployment"], x, x["deployment"]) for x in rows],
        line("whole pipeline (one process)", whole, "whole pipeline"),
        "",
        "| target | measured | goal | met |",
        "|---|---|---|:-:|",
        *[f"| {t} | {m} | {g} | {'yes' if ok else '**no**'} |"
          for t, m, g, ok in memory_targets(mem)],
        "",
        "Weights held are what each replica reports after the request; its peak RSS shows what "
        "it had in memory at any time.",
        "",
    ]
    return lines

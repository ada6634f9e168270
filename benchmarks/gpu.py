"""The GPU benchmark: one command, one GPU, under 10 minutes; writes the GPU section of
BENCHMARKS.md (between its markers; `make bench` keeps that section as it is).

    .venv/bin/python -m benchmarks.gpu                      # vit_h + BEiT-3 large, on cuda:0
    .venv/bin/python -m benchmarks.gpu --sam vit_b --beit3 base --runs 5
    .venv/bin/python -m benchmarks.gpu --device cpu --profile configs/models/tiny.yaml --runs 1 \
        --no-served --out /tmp/x.md                         # the code path, on tiny models

Without CUDA (and no `--device cpu`) it says so and exits 0, writing nothing.

Rows, each with the peak GPU memory it allocated (torch.cuda.max_memory_allocated, reset per row):
- the SAM image encoder at float32 / bfloat16 / float16, three forwards: segment-anything's
  reference; the fast path (biprompt.models.fast_attention) with the CPU's cache-sized bias
  blocks; the fast path with the whole bias in one SDPA call per attention (what CUDA runs
  today). The fastest fast variant is reported as the decision for CUDA;
- the point decoder (the serving engine, so mask upscaling and the copy back count) on 1 / 16 /
  64 prompts against one embedding;
- the text model (BEiT-3 + EVF's decoder; the serving engine) at batch 1 and 16;
- the served app on this GPU (encoder, decoder and text replicas sharing it): cold requests (new
  image) and warm ones (same image, another click and expression), with each replica's peak.

Random weights in the real shapes (benchmarks/checkpoints.py writes them once under --root and
loads them through the normal loading code): timings only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- gpu-benchmark:begin -->", "<!-- gpu-benchmark:end -->"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("reference", "fast, blocked bias", "fast, whole bias")
DECODER_PROMPTS = (1, 16, 64)
TEXT_BATCHES = (1, 16)
# GPU shares of the served app's model replicas on the one GPU (Serve's fractional num_gpus)
SERVED_GPUS = {"ImageEncoder": 0.4, "PointDecoder": 0.2, "TextMask": 0.4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> dict:
    """Median / min ms of `runs` calls after `warmup`, and the peak memory they allocated."""
    for _ in range(warmup):
        fn()
    _sync(device)
    _reset_peak(device)
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        _sync(device)
        ms.append((time.perf_counter() - t) * 1000)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "runs": runs,
            "peak_mb": _peak_mb(device)}


@contextlib.contextmanager
def bias_budget(device: torch.device, elements: int | None):
    """The fast path's bias block on `device` for the duration (None: the whole bias)."""
    from biprompt.models import fast_attention as fa

    key = device.type
    if key == "cpu":
        saved = fa.BIAS_ELEMENTS
        fa.BIAS_ELEMENTS = elements if elements is not None else 1 << 62
        try:
            yield
        finally:
            fa.BIAS_ELEMENTS = saved
        return
    had, saved = key in fa.BIAS_ELEMENTS_BY_DEVICE, fa.BIAS_ELEMENTS_BY_DEVICE.get(key)
    if elements is None:
        fa.BIAS_ELEMENTS_BY_DEVICE.pop(key, None)
    else:
        fa.BIAS_ELEMENTS_BY_DEVICE[key] = elements
    try:
        yield
    finally:
        if had:
            fa.BIAS_ELEMENTS_BY_DEVICE[key] = saved
        else:
            fa.BIAS_ELEMENTS_BY_DEVICE.pop(key, None)


def encoder_rows(profile, device: torch.device, runs: int, dtypes=tuple(DTYPES)) -> list[dict]:
    from biprompt.factory import open_sam
    from biprompt.models.fast_attention import BIAS_ELEMENTS, set_fast_attention
    from biprompt.profile import ModelProfile

    p = ModelProfile.load(profile)
    src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        enc = _encoder(src, dtype, device)
        x = torch.randn(1, 3, src.spec.img_size, src.spec.img_size, device=device, dtype=dtype)
        for variant in VARIANTS:
            set_fast_attention(enc, variant != "reference")
            budget = BIAS_ELEMENTS if variant == "fast, blocked bias" else None
            with torch.inference_mode(), bias_budget(device, budget):
                r = timed(lambda e=enc, x=x: e(x), device, runs)
            rows.append({"dtype": name, "variant": variant, **r})
        del enc, x
        _reset_peak(device)
    return rows


def _encoder(src, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from biprompt.factory import load_sam_part

    return load_sam_part(src, "image_encoder", dtype).to(device, dtype).eval()


def fast_path_decision(rows: list[dict]) -> dict:
    """Per dtype, which fast variant was faster, and by how much over the reference."""
    out = {}
    for name in {r["dtype"] for r in rows}:
        by = {r["variant"]: r["median_ms"] for r in rows if r["dtype"] == name}
        best = min(VARIANTS[1:], key=lambda v: by[v])
        out[name] = {"faster": best, "ratio_vs_other": by[_other(best)] / by[best],
                     "speedup_vs_reference": by["reference"] / by[best]}
    return out


def default_variant(device: torch.device) -> str:
    """The fast variant the code runs on `device` when nobody overrides the budget."""
    from biprompt.models.fast_attention import BIAS_ELEMENTS, bias_budget

    return VARIANTS[1] if bias_budget(device) <= BIAS_ELEMENTS else VARIANTS[2]


def _other(variant: str) -> str:
    return VARIANTS[2] if variant == VARIANTS[1] else VARIANTS[1]


def _engines(profile: Path, device: torch.device, dtype: str):
    from biprompt.engines.encoder import ImageEncoderEngine
    from biprompt.engines.point_decoder import PointDecoderEngine
    from biprompt.engines.text_mask import TextMaskEngine

    opts = {"device": str(device), "dtype": dtype}
    return (ImageEncoderEngine.from_profile(profile, **opts),
            PointDecoderEngine.from_profile(profile, **opts),
            TextMaskEngine.from_profile(profile, **opts))


def _scene_images(n: int, seed: int, size=(480, 640)) -> list[np.ndarray]:
    from biprompt.data.shapes_ref import generate_scene

    rng = np.random.default_rng(seed)
    return [generate_scene(rng, *size).image for _ in range(n)]


def decoder_text_rows(profile: Path, device: torch.device, runs: int, dtype: str = "float16",
                      seed: int = 0) -> dict:
    from biprompt.prompts import make_prompt

    encoder, decoder, text = _engines(profile, device, dtype)
    images = _scene_images(max(TEXT_BATCHES), seed)
    embs = encoder.embed_batch(images[:1]) * max(TEXT_BATCHES)
    rng = np.random.default_rng(seed)
    h, w = images[0].shape[:2]
    out: dict = {"dtype": dtype, "decoder": [], "text": []}
    for k in DECODER_PROMPTS:
        prompts = [make_prompt((h, w), [[float(rng.uniform(0, w)), float(rng.uniform(0, h))]])
                   for _ in range(k)]
        r = timed(lambda p=prompts: decoder.decode_points(embs[0], p), device, runs)
        out["decoder"].append({"prompts": k, **r, "ms_per_prompt": r["median_ms"] / k})
    for b in TEXT_BATCHES:
        texts = ["the large red circle"] * b
        r = timed(lambda b=b, t=texts: text.text_masks(embs[:b], t), device, runs)
        out["text"].append({"batch": b, **r, "ms_per_pair": r["median_ms"] / b})
    return out


def gpu_profile(profile: Path, out_dir: Path, device: str, dtype: str) -> Path:
    """A copy of `profile` placed on `device` at `dtype` (paths made absolute)."""
    d = yaml.safe_load(profile.read_text())
    for part in ("sam", "text_model"):
        ck = (d.get(part) or {}).get("checkpoint")
        if ck and not Path(ck).is_absolute():
            d[part]["checkpoint"] = str((profile.parent / ck).resolve())
    d.update(device=device, dtype=dtype, name=f"{d.get('name', 'model')}-{device}")
    path = out_dir / f"{profile.stem}-{device.replace(':', '')}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def served_rows(profile: Path, cold: int, warm: int, seed: int) -> dict:
    """The app on this GPU: cold and warm requests through Serve's proxy, per-replica peaks."""
    import ray
    from ray import serve

    from benchmarks.serving import Bench, Scenes, free_port
    from deployments.driver import DriverCalls
    from graph import build_app

    ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    calls = DriverCalls()
    try:
        opts = {name: {"ray_actor_options": {"num_cpus": 1, "num_gpus": g}}
                for name, g in SERVED_GPUS.items()}
        t = time.perf_counter()
        serve.run(build_app({"model_profile": str(profile), "deployment_options": opts}),
                  name="gpu", route_prefix="/gpu")
        startup = time.perf_counter() - t
        bench = Bench(f"http://127.0.0.1:{port}/gpu", "gpu", calls)
        scenes = Scenes(seed, (480, 640))
        scene, data = scenes.image()
        bench.segment({"image": data, **scenes.prompt(scene)})  # the path warmed up
        fresh = [scenes.image() for _ in range(cold)]
        rows = {"startup_s": startup,
                "cold": bench.requests([{"image": d, **scenes.prompt(s)} for s, d in fresh])}
        s, d = fresh[-1]
        image_id = bench.client.embed(d)
        rows["warm"] = bench.requests([{"image_id": image_id, **scenes.prompt(s)}
                                       for _ in range(warm)])
        rows["replicas"] = {name: calls.call("gpu", name, "stats").get("gpu")
                            for name in SERVED_GPUS}
        return rows
    finally:
        calls.close()
        serve.shutdown()
        ray.shutdown()


def render(res: dict) -> str:
    lines = [BEGIN, "## GPU", "",
             f"`python -m benchmarks.gpu` on {res['device_name']}, torch {res['torch']}, "
             f"{res['sam']} + BEiT-3 {res['beit3']} (random weights), "
             f"{res['seconds']:.0f} s in all, {res['date']}. Medians of {res['runs']} runs; "
             "peak = torch.cuda.max_memory_allocated during the row.", "",
             "### Image encoder, one image at its input size", "",
             "| dtype | forward | median ms | min ms | peak MiB |", "|---|---|---:|---:|---:|"]
    for r in res["encoder"]:
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {_mb(r['peak_mb'])} |")
    lines += ["", "Faster fast variant here, per dtype: "
              + "; ".join(f"{d}: {v['faster']} ({v['ratio_vs_other']:.2f}x the other, "
                          f"{v['speedup_vs_reference']:.2f}x the reference)"
                          for d, v in sorted(res["fast_path"].items()))
              + f". The code's default on this device: {res['default_variant']}"
              + (" (agrees at float16)." if res["fast_path"].get("float16", {}).get("faster")
                 == res["default_variant"] else " (float16 disagrees: change "
                 "BIAS_ELEMENTS_BY_DEVICE in biprompt/models/fast_attention.py)."), "",
              f"### Point decoder and text model ({res['engines']['dtype']}, serving engines)", "",
              "| stage | batch | median ms | per item ms | peak MiB |", "|---|---:|---:|---:|---:|"]
    for r in res["engines"]["decoder"]:
        lines.append(f"| point decoder | {r['prompts']} prompts | {r['median_ms']:.2f} | "
                     f"{r['ms_per_prompt']:.3f} | {_mb(r['peak_mb'])} |")
    for r in res["engines"]["text"]:
        lines.append(f"| text model | {r['batch']} | {r['median_ms']:.2f} | "
                     f"{r['ms_per_pair']:.3f} | {_mb(r['peak_mb'])} |")
    s = res.get("served")
    if s:
        lines += ["", "### Served app on this GPU (Serve's proxy, concurrency 1)", "",
                  "| requests | n | p50 ms | p95 ms | encoder passes |", "|---|---:|---:|---:|---:|"]
        for k in ("cold", "warm"):
            r = s[k]
            lines.append(f"| {k} | {r['latency_ms']['n']} | {r['latency_ms']['median']:.1f} | "
                         f"{r['latency_ms']['p95']:.1f} | {r['encoder_passes']} |")
        peaks = ", ".join(f"{n} {_mb((g or {}).get('peak_mb'))} MiB"
                          for n, g in s["replicas"].items())
        lines += ["", f"Start-up {s['startup_s']:.0f} s; peak GPU memory per replica: {peaks}."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _mb(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def splice(document: str, section: str) -> str:
    """`document` with its GPU section replaced by `section` (appended when it has none)."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + section.rstrip("\n") + tail
    return document.rstrip("\n") + "\n\n" + section


def kept_section(document: str) -> str | None:
    """The GPU section of an existing BENCHMARKS.md (for `make bench` to carry over)."""
    if BEGIN in document and END in document:
        return BEGIN + document.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sam", default="vit_h", help="SAM variant of the random checkpoints")
    ap.add_argument("--beit3", default="large", help="BEiT-3 scale of the random EVF-SAM")
    ap.add_argument("--profile", default=None, help="use this model profile instead of writing "
                    "random checkpoints")
    ap.add_argument("--root", default=str(REPO / "out/bench/gpu-checkpoints"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cold", type=int, default=10)
    ap.add_argument("--warm", type=int, default=30)
    ap.add_argument("--no-served", action="store_true", help="skip the served-app rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(REPO / "out/bench/gpu.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: skipped, no CUDA device (torch.cuda.is_available() is False); "
              "nothing written", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.profile:
        base = Path(args.profile).resolve()
        sam, beit3 = "profile " + base.name, "(profile)"
    else:
        from benchmarks.checkpoints import write_vitb_checkpoints

        print(f"[gpu] random {args.sam} + BEiT-3 {args.beit3} checkpoints under {root}",
              flush=True)
        base = Path(write_vitb_checkpoints(root, sam_variant=args.sam,
                                           beit3_scale=args.beit3)["profile"])
        sam, beit3 = args.sam, args.beit3
    dtype = "float16" if device.type == "cuda" else "float32"
    profile = gpu_profile(base, root, str(device), dtype)
    res = {"device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu"), "torch": torch.__version__, "sam": sam, "beit3": beit3,
           "runs": args.runs, "date": time.strftime("%Y-%m-%d")}
    print("[gpu] image encoder", flush=True)
    res["encoder"] = encoder_rows(profile, device, args.runs)
    res["fast_path"] = fast_path_decision(res["encoder"])
    res["default_variant"] = default_variant(device)
    print("[gpu] point decoder and text model", flush=True)
    res["engines"] = decoder_text_rows(profile, device, args.runs, dtype, args.seed)
    if not args.no_served:
        print("[gpu] served app", flush=True)
        res["served"] = served_rows(profile, args.cold, args.warm, args.seed)
    res["seconds"] = time.perf_counter() - t0
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2, default=str))
    out = Path(args.out)
    section = render(res)
    out.write_text(splice(out.read_text() if out.exists() else "# Benchmarks\n", section))
    print(section)
    print(f"[gpu] wrote {out} and {out_json} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

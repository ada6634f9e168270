"""What a served BiPrompt request costs: cold, warm, a click session, 200 requests over 20 images
(SDK and batch endpoint) and HTTP concurrency, on a real local Serve app.

    .venv/bin/python benchmarks/serving.py --profile configs/models/demo.yaml --quick

Every row reports median / p95 / min / max latency (client side), throughput, encoder passes (the
encoder deployment's own counter), cache hit rate, and serving overhead: end-to-end latency minus
the model compute the deployments report (encoder + the slower of point decoder and text model +
selector). Work in progress for issue 6: the naive baseline and the vit_b scale come next.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from biprompt.data.shapes_ref import generate_scene, sample_from_scene

REPO = Path(__file__).resolve().parent.parent


def summary(values: list[float]) -> dict:
    xs = sorted(values)
    if not xs:
        return {}
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"n": len(xs), "median": statistics.median(xs), "p95": p95, "min": xs[0],
            "max": xs[-1]}


def model_ms(t: dict) -> float:
    """Model compute a request paid for, from the deployments' own timings."""
    parallel = max(t.get("point_decoder", 0.0), t.get("text_model", 0.0))
    return t.get("encoder", 0.0) + parallel + t.get("selector", 0.0)


class Scenes:
    """Seeded ShapesRef scenes as PNG bytes, with one fresh click + expression per call."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def image(self):
        scene = generate_scene(self.rng)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG")
        return scene, buf.getvalue()

    def prompt(self, scene) -> dict:
        s = sample_from_scene(scene, self.rng)
        return {"points": [list(s.point_index)], "text": s.expression}


class Bench:
    def __init__(self, url: str, app: str):
        self.url, self.app = url, app
        self.http = httpx.Client(base_url=url, timeout=300)

    def encoder_images(self) -> int:
        from ray import serve

        handle = serve.get_deployment_handle("ImageEncoder", app_name=self.app)
        return handle.stats.remote().result()["images"]

    def segment(self, body: dict) -> tuple[float, dict]:
        t = time.perf_counter()
        r = self.http.post("/v1/segment", content=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        ms = (time.perf_counter() - t) * 1000
        r.raise_for_status()
        return ms, r.json()

    def requests(self, bodies: list[dict], concurrency: int = 1) -> dict:
        before = self.encoder_images()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(self.segment, bodies))
        seconds = time.perf_counter() - t0
        lat = [ms for ms, _ in out]
        over = [ms - model_ms(r["timings_ms"]) for ms, r in out]
        hits = sum(r["cache"] == "hit" for _, r in out)
        return {"latency_ms": summary(lat), "overhead_ms": summary(over),
                "throughput_rps": len(out) / seconds, "encoder_passes":
                self.encoder_images() - before, "cache_hit_rate": hits / len(out)}


def body(data: bytes, prompt: dict) -> dict:
    import base64

    return {"image": base64.b64encode(data).decode(), **prompt, "mask_format": "rle"}


def run_scenarios(bench: Bench, n: int, seed: int) -> dict:
    scenes = Scenes(seed)
    rows = {}
    fresh = [scenes.image() for _ in range(n)]
    rows["cold request"] = bench.requests([body(d, scenes.prompt(s)) for s, d in fresh])
    rows["warm request (same image, new click, new text)"] = bench.requests(
        [body(d, scenes.prompt(s)) for s, d in fresh])
    scene, data = scenes.image()
    rows["20-click session on one image"] = bench.requests(
        [body(data, scenes.prompt(scene)) for _ in range(20)])
    imgs = [scenes.image() for _ in range(20)]
    reqs = [(s, d, scenes.prompt(s)) for i in range(200) for s, d in [imgs[i % 20]]]
    rows["200 requests / 20 images, SDK segment_many"] = sdk_many(bench, reqs)
    imgs = [scenes.image() for _ in range(20)]
    reqs = [(s, d, scenes.prompt(s)) for i in range(200) for s, d in [imgs[i % 20]]]
    rows["200 requests / 20 images, batch endpoint"] = batch_endpoint(bench, reqs)
    scene, data = scenes.image()
    bench.segment(body(data, scenes.prompt(scene)))  # make it warm
    for c in (1, 4, 8):
        rows[f"warm, HTTP concurrency {c}"] = bench.requests(
            [body(data, scenes.prompt(scene)) for _ in range(8 * c)], concurrency=c)
    return rows


def sdk_many(bench: Bench, reqs) -> dict:
    from biprompt_client import BiPromptClient

    before = bench.encoder_images()
    t0 = time.perf_counter()
    with BiPromptClient(bench.url, timeout=300) as c:
        res = c.segment_many([{"image": d, **p} for _, d, p in reqs], concurrency=8,
                             progress=False)
    seconds = time.perf_counter() - t0
    ok = [r for r in res if r.ok]
    return {"throughput_rps": len(reqs) / seconds, "seconds": seconds,
            "encoder_passes": bench.encoder_images() - before, "ok": len(ok),
            "cache_hit_rate": sum(r.cache_hit for r in ok) / max(1, len(ok))}


def batch_endpoint(bench: Bench, reqs, chunk: int = 50) -> dict:
    before = bench.encoder_images()
    t0 = time.perf_counter()
    results = []
    for i in range(0, len(reqs), chunk):
        items = [body(d, p) for _, d, p in reqs[i : i + chunk]]
        r = bench.http.post("/v1/segment/batch", json={"items": items})
        r.raise_for_status()
        results += r.json()["results"]
    seconds = time.perf_counter() - t0
    ok = [x["result"] for x in results if x["status"] == 200]
    return {"throughput_rps": len(reqs) / seconds, "seconds": seconds,
            "encoder_passes": bench.encoder_images() - before, "ok": len(ok),
            "cache_hit_rate": sum(r["cache"] == "hit" for r in ok) / max(1, len(ok))}


def start(profile: str, cache_url: str | None) -> str:
    import ray
    from ray import serve

    from graph import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_profile": profile, "cache_url": cache_url}), name="bench",
              route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(REPO / "configs/models/demo.yaml"))
    ap.add_argument("--cache-url", default=None)
    ap.add_argument("--n", type=int, default=10, help="cold/warm requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    url = start(args.profile, args.cache_url)
    try:
        rows = run_scenarios(Bench(url, "bench"), args.n, args.seed)
    finally:
        from ray import serve

        serve.shutdown()
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return rows


if __name__ == "__main__":
    main()

"""What a served BiPrompt request costs: cold, warm, a click session, 200 requests over 20 images
(SDK and batch endpoint) and HTTP concurrency, on a real local Serve app driven by the SDK.

    .venv/bin/python -m benchmarks.serving --profile configs/models/demo.yaml

Every row reports client-side latency (median / p95 / min / max), throughput, encoder passes (the
encoder deployment's own counter), cache hit rate, and serving overhead: end-to-end latency minus
the model compute the deployments report (encoder + the slower of point decoder and text model +
selector).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from benchmarks.stats import summary
from biprompt.data.shapes_ref import generate_scene, sample_from_scene
from deployments.driver import DriverCalls, apply_serve_env


def breakdown_ms(latency_ms: float, t: dict) -> dict:
    """Where a request's time went outside the models: the HTTP path to and from the Ingress
    (client, Serve's proxy, body coding), the Ingress's own work, the cache, and the hops to the
    models and the Selector (each wait minus the compute the replica reports)."""
    total = t.get("total", 0.0)
    models = max(t.get("point_decoder", 0.0), t.get("text_model", 0.0))
    waits = t.get("models_wait", 0.0) + t.get("selector_wait", 0.0)
    if not t.get("selector_wait"):  # joined on the PointDecoder: its wait holds the join
        models += t.get("selector", 0.0)
    return {"http_proxy": latency_ms - total,
            "ingress": total - waits - t.get("cache", 0.0) - t.get("image_decode", 0.0)
            - (t.get("encoder", 0.0) if t.get("encoder") else 0.0),
            "cache": t.get("cache", 0.0),
            "model_hops": t.get("models_wait", 0.0) - models,
            "selector_hop": (t["selector_wait"] - t.get("selector", 0.0)
                             if t.get("selector_wait") else 0.0)}


def model_ms(t: dict) -> float:
    """Model compute a request paid for, from the deployments' own timings."""
    parallel = max(t.get("point_decoder", 0.0), t.get("text_model", 0.0))
    return t.get("encoder", 0.0) + parallel + t.get("selector", 0.0)


class Scenes:
    """Seeded ShapesRef scenes as PNG bytes, with a fresh click + expression per call."""

    def __init__(self, seed: int, size: tuple[int, int] = (256, 256)):
        self.rng = np.random.default_rng(seed)
        self.size = size

    def image(self):
        scene = generate_scene(self.rng, *self.size)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG")
        return scene, buf.getvalue()

    def prompt(self, scene) -> dict:
        s = sample_from_scene(scene, self.rng)
        return {"points": [list(s.point_index)], "text": s.expression}

    def new_text_prompt(self, scene, used: set[str]) -> dict | None:
        """A click on an object whose expression this image has not been asked yet (so the text
        model must run); None when every object's expression was used."""
        order = self.rng.permutation(len(scene.objects))
        for target in order:
            s = sample_from_scene(scene, self.rng, target=int(target))
            if s.expression not in used:
                used.add(s.expression)
                return {"points": [list(s.point_index)], "text": s.expression}
        return None


@dataclass
class Plan:
    """How many requests each scenario sends."""

    cold: int = 5
    warm: int = 10
    session_clicks: int = 20
    many: bool = True  # 200 requests over 20 images, SDK and batch endpoint
    concurrency: tuple[int, ...] = (1, 4, 8)
    per_level: int = 8  # requests per concurrent client
    direct_url: str | None = None  # the ingress replica's own HTTP port (direct ingress)
    image_size: tuple[int, int] = (256, 256)
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, url: str, app: str, calls: DriverCalls):
        from biprompt_client import BiPromptClient

        self.url, self.app, self.calls = url, app, calls
        self.client = BiPromptClient(url, timeout=600, max_retries=0)

    def encoder_images(self) -> int:
        return self.calls.call(self.app, "ImageEncoder", "stats")["images"]

    def segment(self, kw: dict) -> tuple[float, object]:
        t = time.perf_counter()
        res = self.client.segment(**kw)
        return (time.perf_counter() - t) * 1000, res

    def requests(self, calls: list[dict], concurrency: int = 1) -> dict:
        before = self.encoder_images()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(self.segment, calls))
        seconds = time.perf_counter() - t0
        lat = [ms for ms, _ in out]
        over = [ms - model_ms(r.timings_ms) for ms, r in out]
        parts = [breakdown_ms(ms, r.timings_ms) for ms, r in out]
        moved = [r.raw.get("bytes_moved") or {} for _, r in out]
        return {"latency_ms": summary(lat), "overhead_ms": summary(over),
                "bytes_moved": summary([float(m.get("total", 0)) for m in moved]),
                "bytes_moved_by_hop": {k: statistics.median(float(m.get(k, 0)) for m in moved)
                                       for k in ("encoder", "points", "text", "selector")},
                "model_ms": summary([model_ms(r.timings_ms) for _, r in out]),
                "overhead_parts_ms": {k: statistics.median(p[k] for p in parts)
                                      for k in parts[0]},
                "throughput_rps": len(out) / seconds, "seconds": seconds,
                "encoder_passes": self.encoder_images() - before,
                "cache_hit_rate": sum(r.cache_hit for _, r in out) / len(out),
                "text_cache_hit_rate": sum(bool(r.text_cache_hit) for _, r in out) / len(out)}


def run_scenarios(bench: Bench, plan: Plan, seed: int = 0) -> dict:
    scenes = Scenes(seed, plan.image_size)
    rows = {}
    fresh = [scenes.image() for _ in range(max(plan.cold, 1))]
    bench.segment({"image": fresh[-1][1], **scenes.prompt(fresh[-1][0])})  # warm the path up
    fresh = [scenes.image() for _ in range(plan.cold)]
    cold = [{"image": d, **scenes.prompt(s)} for s, d in fresh]
    rows["cold"] = bench.requests(cold)
    rows["warm"] = bench.requests(_warm_new_text(bench, scenes, fresh, cold, plan.warm))
    scene, data = scenes.image()
    first = bench.requests([{"image": data, **scenes.prompt(scene)}])
    image_id = bench.client.embed(data)  # a cache hit: the click above encoded it
    rest = bench.requests([{"image_id": image_id, **scenes.prompt(scene)}
                           for _ in range(plan.session_clicks - 1)])
    rows["session"] = {**rest, "first_click_ms": first["latency_ms"]["median"],
                       "session_s": first["seconds"] + rest["seconds"],
                       "encoder_passes": first["encoder_passes"] + rest["encoder_passes"],
                       "clicks": plan.session_clicks}
    if plan.many:
        rows["many_sdk"] = many_sdk(bench, _many(scenes))
        rows["many_batch"] = many_batch(bench, _many(scenes))
    scene, data = scenes.image()
    bench.segment({"image": data, **scenes.prompt(scene)})  # make it warm
    for c in plan.concurrency:
        rows[f"concurrency_{c}"] = bench.requests(
            [{"image": data, **scenes.prompt(scene)} for _ in range(plan.per_level * c)],
            concurrency=c)
    if plan.direct_url:
        direct = Bench(plan.direct_url, bench.app, bench.calls)
        direct.segment({"image": data, **scenes.prompt(scene)})
        rows["concurrency_1_direct"] = direct.requests(
            [{"image": data, **scenes.prompt(scene)} for _ in range(2 * plan.per_level)])
    return rows


def text_cached_clicks(bench: Bench, scenes: Scenes, n: int) -> dict:
    """`n` warm clicks, one at a time, on one encoded image, each a new point with the same
    expression, whose text mask is cached after the untimed first request: the click an
    annotator makes while refining one object."""
    scene, data = scenes.image()
    first = scenes.prompt(scene)
    bench.segment({"image": data, **first})  # encodes the image, caches the text mask
    image_id = bench.client.embed(data)
    h, w = scene.image.shape[:2]
    xy = scenes.rng.uniform((0, 0), (w - 1, h - 1), size=(n, 2))
    return bench.requests([{"image_id": image_id, "points": [[float(x), float(y)]],
                            "text": first["text"]} for x, y in xy])


def find_direct_url(app: str, tries: int = 32) -> str | None:
    """Where the app's ingress replica answers HTTP itself (Serve's direct ingress, on in
    throughput-optimized mode): the first port from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT on
    whose /healthz answers. None when the mode is off."""
    import os

    import httpx

    first = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    for port in range(first, first + tries):
        url = f"http://127.0.0.1:{port}/{app}"
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                return url
        except httpx.HTTPError:
            continue
    return None


def _warm_new_text(bench: Bench, scenes: Scenes, fresh: list, cold: list[dict],
                   n: int) -> list[dict]:
    """n requests on already-encoded images, each with a click and an expression that image has
    not been asked (so its text mask is not cached). Extra images are embedded, untimed, when
    the cold ones run out of unasked objects."""
    pool = [(s, d, {c["text"]}) for (s, d), c in zip(fresh, cold, strict=True)]
    calls: list[dict] = []
    k = exhausted = 0
    while len(calls) < n:
        if exhausted >= len(pool):  # a whole round without a new expression
            scene, data = scenes.image()
            bench.client.embed(data)
            pool.append((scene, data, set()))
            k, exhausted = len(pool) - 1, 0
        scene, data, used = pool[k % len(pool)]
        k += 1
        prompt = scenes.new_text_prompt(scene, used)
        if prompt is None:
            exhausted += 1
            continue
        exhausted = 0
        calls.append({"image": data, **prompt})
    return calls


def _many(scenes: Scenes, n: int = 200, images: int = 20) -> list[dict]:
    imgs = [scenes.image() for _ in range(images)]
    return [{"image": imgs[i % images][1], **scenes.prompt(imgs[i % images][0])}
            for i in range(n)]


def many_sdk(bench: Bench, reqs: list[dict]) -> dict:
    before = bench.encoder_images()
    t0 = time.perf_counter()
    res = bench.client.segment_many(reqs, concurrency=8, progress=False)
    seconds = time.perf_counter() - t0
    ok = [r for r in res if r.ok]
    return {"requests": len(reqs), "ok": len(ok), "seconds": seconds,
            "throughput_rps": len(reqs) / seconds,
            "encoder_passes": bench.encoder_images() - before,
            "cache_hit_rate": sum(r.cache_hit for r in ok) / max(1, len(ok))}


def many_batch(bench: Bench, reqs: list[dict], chunk: int = 50) -> dict:
    before = bench.encoder_images()
    t0 = time.perf_counter()
    results = []
    for i in range(0, len(reqs), chunk):
        results += bench.client.segment_batch(reqs[i:i + chunk])
    seconds = time.perf_counter() - t0
    ok = [r for r in results if getattr(r, "ok", True)]
    return {"requests": len(reqs), "ok": len(ok), "seconds": seconds,
            "throughput_rps": len(reqs) / seconds,
            "encoder_passes": bench.encoder_images() - before,
            "cache_hit_rate": sum(r.cache_hit for r in ok) / max(1, len(ok))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster() -> int:
    """A local Ray cluster with Serve's HTTP proxy on a free port; returns the port."""
    import ray
    from ray import serve

    apply_serve_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy(port: int, profile: str, app: str, cache_url: str | None = None,
           backends: dict[str, str] | None = None) -> tuple[str, float]:
    """Deploy the app (each role on `backends`, default: the profile's); returns its URL and the
    start-up time in seconds."""
    from ray import serve

    from graph import build_app

    t = time.perf_counter()
    args = {"model_profile": profile, "cache_url": cache_url}
    if backends:
        args["backends"] = backends
    serve.run(build_app(args), name=app, route_prefix=f"/{app}")
    return f"http://127.0.0.1:{port}/{app}", time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="configs/models/demo.yaml")
    ap.add_argument("--cache-url", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from ray import serve

    port = start_cluster()
    calls = DriverCalls()
    try:
        url, startup = deploy(port, args.profile, "bench", args.cache_url)
        rows = run_scenarios(Bench(url, "bench", calls), Plan(), args.seed)
        rows["startup_s"] = startup
    finally:
        calls.close()
        serve.shutdown()
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()

"""A real local Ray cluster with Serve on a free port, the tiny profile, and a real redis-server of
the tests' own. Two apps share the cluster:

- `main`: Redis cache, float16 embeddings (the production settings);
- `strict`: in-process cache, float32 embeddings (bit-exact against the in-process pipeline), an
  API key, small body/pixel limits, and an encoder that queues at most one request (backpressure).
"""

from __future__ import annotations

import functools
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration

API_KEY = "test-key-123"
STRICT_LIMITS = {"max_body_mb": 1.0, "max_image_pixels": 200_000}


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def scene(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """A noisy image with a few flat rectangles: distinct per seed."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 60), rng.integers(0, w - 80)
        img[y : y + 50, x : x + 70] = rng.integers(100, 255, size=3)
    return img


@pytest.fixture(scope="session")
def redis_srv():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def metrics_port():
    return free_port()


@pytest.fixture(scope="session")
def serve_url(metrics_port):
    import ray
    from ray import serve

    from deployments.driver import apply_serve_env

    apply_serve_env()  # the mode our launchers run Serve in (RAY_SERVE_THROUGHPUT_OPTIMIZED)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _run(app_name: str, args: dict) -> None:
    from ray import serve

    from graph import build_app

    t = time.perf_counter()
    serve.run(build_app(args), name=app_name, route_prefix=f"/{app_name}")
    print(f"app {app_name} up in {time.perf_counter() - t:.1f} s")


@pytest.fixture(scope="session")
def main_url(serve_url, redis_srv):
    _run("main", {"model_profile": "configs/models/tiny.yaml", "cache_url": redis_srv.url,
                  "cache_timeout_s": 0.3, "embedding_dtype": "float16"})
    return f"{serve_url}/main"


@pytest.fixture(scope="session")
def strict_url(serve_url):
    small = {"num_cpus": 0.1}
    _run("strict", {
        "model_profile": "configs/models/tiny.yaml", "cache_url": None,
        "embedding_dtype": "float32", "api_key": API_KEY, **STRICT_LIMITS,
        "deployment_options": {
            "ImageEncoder": {"max_ongoing_requests": 1, "max_queued_requests": 1,
                             "user_config": {"max_batch_size": 1}, "ray_actor_options": small},
            "PointDecoder": {"ray_actor_options": small},
            "TextMask": {"ray_actor_options": small},
            "Selector": {"ray_actor_options": small},
            "Ingress": {"ray_actor_options": small},
        },
    })
    return f"{serve_url}/strict"


@functools.cache
def _driver_calls():
    # NOTE: this module is imported twice (as pytest's conftest and by the test modules), so
    # the helper is created on first use rather than by a fixture.
    from deployments.driver import DriverCalls

    return DriverCalls()


def stats(app: str, deployment: str) -> dict:
    return _driver_calls().call(app, deployment, "stats")

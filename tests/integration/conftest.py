"""A real local Ray cluster with Serve on a free port, the tiny profile, and a real redis-server of
the tests' own. Three apps share the cluster:

- `main`: Redis cache, float16 embeddings (the production settings);
- `fault`: the same on a Redis of its own, for the test that kills it (a restarted Redis leaves
  each store's pooled connections dead; each fails once when next used and re-arms the cache's
  cool-down, which must not turn other tests' cache hits into misses);
- `strict`: in-process cache, float32 embeddings (bit-exact against the in-process pipeline), an
  API key, small body/pixel limits, and an encoder that runs one request and queues one, behind a
  gate the tests can close (tests/support/gated_encoder.py): backpressure without racing a burst.

Bit-exact comparisons with the in-process `tiny_pipeline` hold because both sides run one code
path: the same profile, batches of one, and the served models pinned to this process's torch
thread count (a thread count can change how a kernel splits a sum, and so its rounding). Results of
differently batched calls are compared up to rounding (tests/support/parity.py).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from tests.support.gated_encoder import GATE_ENV, EncoderGate
from tests.support.parity import assert_masks_close
from tests.support.redis_server import RedisServer, free_port
from tests.support.scenes import png_bytes, scene  # noqa: F401 - the tests import them here

pytestmark = pytest.mark.integration

API_KEY = "test-key-123"
STRICT_LIMITS = {"max_body_mb": 1.0, "max_image_pixels": 200_000}
# Two calls of one prompt batched with different company round differently: their masks may
# differ where a logit rounds across 0, at most this share of the pixels (measured: none).
MAX_FLIPPED = 1e-3


@pytest.fixture(scope="session")
def redis_srv():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def metrics_port():
    return free_port()


def assert_close_rle(a: dict, b: dict) -> None:
    """Two RLE masks of one prompt from differently batched calls: equal up to MAX_FLIPPED."""
    from biprompt_client import rle

    assert_masks_close(rle.decode(a), rle.decode(b), MAX_FLIPPED)


@pytest.fixture(scope="session")
def encoder_gate(tmp_path_factory) -> EncoderGate:
    return EncoderGate(tmp_path_factory.mktemp("encoder-gate"))


@pytest.fixture(scope="session")
def serve_url(metrics_port, encoder_gate):
    import ray
    from ray import serve

    from deployments.driver import apply_serve_env

    apply_serve_env()  # the mode our launchers run Serve in (RAY_SERVE_THROUGHPUT_OPTIMIZED)
    os.environ[GATE_ENV] = str(encoder_gate.folder)  # before ray.init: replicas inherit it
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _run(app_name: str, args: dict, **deployments) -> None:
    """Deploy `args` as `app_name`; `deployments`: classes standing in for graph.DEPLOYMENTS'."""
    from ray import serve

    import graph

    t = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        for name, cls in deployments.items():
            mp.setitem(graph.DEPLOYMENTS, name, cls)
        serve.run(graph.build_app(args), name=app_name, route_prefix=f"/{app_name}")
    print(f"app {app_name} up in {time.perf_counter() - t:.1f} s")


MODELS = ("ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask")


def _pinned_threads(name: str, **user_config) -> dict:
    """`name`'s default user_config, plus torch_threads = this process's thread count."""
    from graph import DEFAULT_OPTIONS

    return {**DEFAULT_OPTIONS[name].get("user_config", {}),
            "torch_threads": torch.get_num_threads(), **user_config}


@pytest.fixture(scope="session")
def main_url(serve_url, redis_srv):
    # A generous Redis timeout: a loaded machine must not turn a slow reply into a miss.
    _run("main", {"model_profile": "configs/models/tiny.yaml", "cache_url": redis_srv.url,
                  "cache_timeout_s": 5.0, "embedding_dtype": "float16",
                  "deployment_options": {name: {"user_config": _pinned_threads(name)}
                                         for name in MODELS}})
    return f"{serve_url}/main"


@pytest.fixture(scope="session")
def fault_redis():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def fault_url(serve_url, fault_redis):
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    _run("fault", {"model_profile": "configs/models/tiny.yaml", "cache_url": fault_redis.url,
                   "cache_timeout_s": 5.0, "embedding_dtype": "float16",
                   "deployment_options": {
                       name: {**small, "user_config": _pinned_threads(name)} for name in MODELS
                   } | {"Selector": small, "Ingress": small}})
    return f"{serve_url}/fault"


@pytest.fixture(scope="session")
def strict_url(serve_url):
    from tests.support.gated_encoder import GatedImageEncoder

    small = {"num_cpus": 0.1}
    _run("strict", {
        "model_profile": "configs/models/tiny.yaml", "cache_url": None,
        "embedding_dtype": "float32", "api_key": API_KEY, **STRICT_LIMITS,
        "deployment_options": {
            "ImageEncoder": {"max_ongoing_requests": 1, "max_queued_requests": 1,
                             "user_config": _pinned_threads("ImageEncoder", max_batch_size=1),
                             "ray_actor_options": small},
            "PointDecoder": {"user_config": _pinned_threads("PointDecoder"),
                             "ray_actor_options": small},
            "TextMask": {"user_config": _pinned_threads("TextMask"), "ray_actor_options": small},
            "ReferenceMask": {"user_config": _pinned_threads("ReferenceMask"),
                              "ray_actor_options": small},
            "Selector": {"ray_actor_options": small},
            "Ingress": {"ray_actor_options": small},
        },
    }, ImageEncoder=GatedImageEncoder)
    return f"{serve_url}/strict"


@functools.cache
def _driver_calls():
    # NOTE: this module is imported twice (as pytest's conftest and by the test modules), so
    # the helper is created on first use rather than by a fixture.
    from deployments.driver import DriverCalls

    return DriverCalls()


def stats(app: str, deployment: str) -> dict:
    return _driver_calls().call(app, deployment, "stats")


def assert_threads_pinned(app: str) -> None:
    """The served models run with this process's torch threads: the precondition of comparing
    them with the in-process pipeline bit for bit."""
    for name in MODELS:
        assert stats(app, name)["torch_threads"] == torch.get_num_threads(), name

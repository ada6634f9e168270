"""The cluster tier: a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head and two worker nodes, each its own raylet and object store), the real Serve graph on the
tiny profile, and a redis-server of its own. `make test` runs it in a pytest process of its own
(`pytest tests/cluster`): a process holds one Ray connection, and the integration tier's is a
different, single-node Ray.

Placement, by custom resources: the two Ingress replicas live on the head (beside Serve's
controller and HTTP proxy, as on a KubeRay head pod), the models and the Selector on the workers,
so every embedding cache hit at the Ingress reads what an encoder on another node wrote. TextMask
runs two replicas and the ImageEncoder autoscales 1-2, both at most one per node.

The encoder and text model are the real ones behind a 0.3 s hold (tests/support/faulty_models.py)
so that requests are in flight when a replica dies and ongoing requests pile up for the
autoscaler. Serve's autoscaling metrics and Ray's node health checks run faster than their
defaults (TEST_CLUSTER_ENV), and the encoder's autoscaling delays are seconds.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import pytest

from tests.support.faulty_models import SlowImageEncoder, SlowTextMask
from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.cluster

APP = "cluster"
WORKER_CPUS = 2
# Shortened for the test (Serve and Ray read them at process start): autoscaling metrics every
# 0.5 s, not 10 s; a node that stops answering the GCS declared dead after about 5 s (5 missed
# checks a second apart), not Ray's 15 s (3 s x 5).
TEST_CLUSTER_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}
ENCODER_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                       "look_back_period_s": 1.0,
                       "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}


def _on(where: str, num_cpus: float = 0.1) -> dict:
    return {"ray_actor_options": {"num_cpus": num_cpus, "resources": {where: 1}}}


def _model(where: str = "worker", **user_config) -> dict:
    return {**_on(where), "user_config": {"torch_threads": 1, **user_config}}


DEPLOYMENT_OPTIONS = {
    "Ingress": {**_on("head"), "num_replicas": 2},
    "Selector": {**_on("worker"), "num_replicas": 1},
    "PointDecoder": {**_model(), "num_replicas": 1},
    "ReferenceMask": {**_model(), "num_replicas": 1},
    "TextMask": {**_model(max_batch_size=8, batch_wait_timeout_s=0.05), "num_replicas": 2,
                 "max_replicas_per_node": 1},
    "ImageEncoder": {**_model(max_batch_size=8, batch_wait_timeout_s=0.05),
                     "autoscaling_config": ENCODER_AUTOSCALING, "max_replicas_per_node": 1},
}


def add_worker(cluster):
    return cluster.add_node(num_cpus=WORKER_CPUS, resources={"worker": 16})


class Watch:
    """Polls serve.status() every `period_s`: (time, {deployment: (status, running)}) rows, the
    replica timeline the autoscaling and fault tests read."""

    def __init__(self, app: str, period_s: float = 0.25):
        self.app, self.period_s = app, period_s
        self.rows: list[tuple[float, dict[str, tuple[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="serve-watch")

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                deps = serve.status().applications[self.app].deployments
                now = {name: (str(d.status.value if hasattr(d.status, "value") else d.status),
                              int(d.replica_states.get("RUNNING", 0)))
                       for name, d in deps.items()}
                self.rows.append((time.monotonic(), now))
            except Exception:  # noqa: BLE001 - the controller may be busy; poll again
                pass
            self._stop.wait(self.period_s)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def running(self, deployment: str) -> int:
        return self.rows[-1][1][deployment][1] if self.rows else 0

    def timeline(self, deployment: str, since: float = 0.0) -> list[tuple[float, int]]:
        """(time, running replicas) at each change."""
        out: list[tuple[float, int]] = []
        for t, now in self.rows:
            n = now.get(deployment, ("", 0))[1]
            if t >= since and (not out or out[-1][1] != n):
                out.append((t, n))
        return out

    def healthy(self) -> bool:
        return bool(self.rows) and all(s == "HEALTHY" for s, _ in self.rows[-1][1].values())


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> float:
    """Seconds until pred() held; AssertionError naming `what` after timeout_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


STATE_API: list[str | None] = [None]  # the head's dashboard, once the cluster is up


@functools.cache
def _driver_calls():
    from deployments.driver import DriverCalls

    return DriverCalls()


def stats(deployment: str) -> dict:
    """One replica's stats() (Serve picks which)."""
    return _driver_calls().call(APP, deployment, "stats", timeout=30)


def replica_actors(deployment: str | None = None) -> list:
    """The live replica actors of `deployment` (all of the app's if None), from Ray's state
    API: name (SERVE_REPLICA::app#deployment#id), pid, node_id."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP}#" + (f"{deployment}#" if deployment else "")
    alive = list_actors(address=STATE_API[0], filters=[("state", "=", "ALIVE")], limit=1000)
    return [a for a in alive if (a.name or "").startswith(prefix)]


@pytest.fixture(scope="session")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from deployments.driver import apply_serve_env

    apply_serve_env()  # every Ray process of the cluster inherits these
    for key, value in TEST_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    t = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 16}, "gcs_server_port": free_port(),
        "include_dashboard": True, "dashboard_port": free_port()})
    for _ in range(2):
        add_worker(c)
    os.environ["RAY_ADDRESS"] = c.address  # this cluster, whatever other Ray runs here
    ray.init(address=c.address, log_to_driver=False)
    STATE_API[0] = f"http://{c.webui_url}"
    print(f"cluster of {len(ray.nodes())} nodes up in {time.perf_counter() - t:.1f} s")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="session")
def redis_srv():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def app_url(cluster, redis_srv):
    from ray import serve

    import graph

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(graph.DEPLOYMENTS, "ImageEncoder", SlowImageEncoder)
        mp.setitem(graph.DEPLOYMENTS, "TextMask", SlowTextMask)
        serve.run(graph.build_app({
            "model_profile": "configs/models/tiny.yaml", "cache_url": redis_srv.url,
            "cache_timeout_s": 2.0, "embedding_dtype": "float16",
            "deployment_options": DEPLOYMENT_OPTIONS}), name=APP, route_prefix="/")
    print(f"app up in {time.perf_counter() - t:.1f} s")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def watch(app_url):
    w = Watch(APP).start()
    yield w
    w.stop()


def all_stats(deployment: str, expected: int, timeout_s: float = 30.0) -> dict[str, dict]:
    """stats() of each of `expected` replicas, by replica id: asked until every one answered
    (Serve routes each call to one replica of its choice, and this driver's router learns of a
    new replica a moment after Serve reports it running)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = stats(deployment)
        seen[s["replica_id"]] = s
        if len(seen) >= expected:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{deployment}: {len(seen)} of {expected} replicas answered stats()")

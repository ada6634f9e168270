"""Running the app from a driver process: Serve's throughput-optimized settings, and deployment
handle calls from synchronous code (benchmarks, tests, the demo).

Serve's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, Ray's documented
high-throughput setting) runs user code and routers on the replica's own event loop, sends
requests between replicas over gRPC, and lets the ingress replica answer HTTP itself. Measured on
the demo model, it cuts the serving overhead of a warm request from about 28 ms to 12 ms through
the proxy. It has to be in the environment of every Ray process: set it before ``ray.init`` or
``ray start`` (on a cluster: in the head and worker pods' environment).
"""

from __future__ import annotations

import asyncio
import os
import threading

# Replies and arguments between replicas go over gRPC in that mode; its default 4 MiB cap is
# smaller than the masks (1 bit a pixel, 3 candidates) or the decoded RGB of a large photo.
GRPC_MAX_MESSAGE = 1 << 30
# NOTE: in that mode the ingress replica answers HTTP itself, and on shutdown Serve holds it open
# for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) so that a load balancer in front can
# deregister it: every `serve.shutdown()` of a local run waited those 30 s ("Controller failed to
# shut down within 30.0s"). These launchers run on one machine with nothing in front, so the hold
# is 1 s; requests in flight are still drained. Behind a load balancer, leave Serve's default.
LOCAL_DRAIN_S = "1"
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE),
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": LOCAL_DRAIN_S,
}


def apply_serve_env(environ=None) -> dict[str, str]:
    """Put SERVE_ENV into the environment unless already set there (an explicit
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` keeps Serve's default mode). Returns the values in force.
    """
    environ = os.environ if environ is None else environ
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in SERVE_ENV}


class DriverCalls:
    """Deployment handle calls from synchronous code, on an event loop thread of their own (in
    throughput-optimized mode a handle's router runs on the caller's loop, so plain
    ``handle.method.remote().result()`` outside a loop is refused)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="serve-driver-calls")
        self._thread.start()

    def call(self, app: str, deployment: str, method: str, *args, timeout: float = 120):
        async def go():
            from ray import serve

            handle = serve.get_deployment_handle(deployment, app_name=app)
            return await getattr(handle, method).remote(*args)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

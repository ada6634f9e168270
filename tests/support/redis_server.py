"""A real redis-server of the test's own, on a free port: started, killed and restarted on the
same port by fault tests. Never touches the machine's Redis on 6379.

It starts from the shipped local config (configs/redis/local.conf: maxmemory + allkeys-lru,
nothing on disk), so the tests run against the bounds a local run has, with a smaller maxmemory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

LOCAL_CONF = Path(__file__).resolve().parents[2] / "configs" / "redis" / "local.conf"
TEST_MAXMEMORY = "256mb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, maxmemory: str = TEST_MAXMEMORY):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, str(LOCAL_CONF), "--port", str(self.port), "--bind", "127.0.0.1",
             "--maxmemory", self.maxmemory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

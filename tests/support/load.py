"""Steady load through the SDK for the cluster tier: threads, each with its own BiPromptClient
(retries on, as a user runs it), sending segment requests until stopped; every request recorded.

The mix: a share of cold images (never seen: an encoder pass and a text-model pass), the rest
warm images from a small pool with a rotating expression (an embedding cache hit; the text mask
is a cache hit once the pair was seen). `concurrency` can change while it runs (a load ramp).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np
from biprompt_client import BiPromptClient

from tests.support.scenes import png_bytes, scene

TEXTS = ("the box", "the bright box", "the left box", "the top box")


@dataclass(frozen=True)
class Sample:
    t0: float  # time.monotonic() when sent
    t1: float  # when answered (after the SDK's retries)
    ok: bool
    error: str | None = None

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000.0


class Load:
    def __init__(self, url: str, concurrency: int = 4, *, cold_share: float = 0.5,
                 seed: int = 0, max_retries: int = 3, timeout_s: float = 60.0,
                 warm_pool: int = 8):
        self.url, self.max_retries, self.timeout_s = url, max_retries, timeout_s
        self.cold_share = cold_share
        self._concurrency = concurrency
        self._seeds = itertools.count(seed * 1_000_000 + 1000)  # cold images: never repeated
        self._warm = [png_bytes(scene(seed * 1_000_000 + i)) for i in range(warm_pool)]
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.samples: list[Sample] = []

    # --- control -------------------------------------------------------------------------

    def start(self, max_threads: int | None = None) -> Load:
        for i in range(max_threads or self._concurrency):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"load-{i}")
            t.start()
            self._threads.append(t)
        return self

    def set_concurrency(self, n: int) -> None:
        """Threads numbered n and up pause after their current request (n <= max_threads)."""
        self._concurrency = n

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s * (self.max_retries + 2))
        return self.snapshot()

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    # --- requests ------------------------------------------------------------------------

    def _next_request(self) -> tuple[bytes, str]:
        with self._lock:
            cold = self._rng.random() < self.cold_share
            png = png_bytes(scene(next(self._seeds))) if cold else \
                self._warm[int(self._rng.integers(len(self._warm)))]
            text = TEXTS[int(self._rng.integers(len(TEXTS)))]
        return png, text

    def _worker(self, i: int) -> None:
        with BiPromptClient(self.url, max_retries=self.max_retries,
                            timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                if i >= self._concurrency:
                    time.sleep(0.05)
                    continue
                png, text = self._next_request()
                t0 = time.monotonic()
                try:
                    res = client.segment(png, points=[[60, 50]], text=text)
                    ok, err = res.mask.shape == (240, 320), None
                except Exception as exc:  # noqa: BLE001 - recorded: the test reports it
                    ok, err = False, f"{type(exc).__name__}: {exc}"[:300]
                with self._lock:
                    self.samples.append(Sample(t0, time.monotonic(), ok, err))


def p(samples: list[Sample], q: float) -> float | None:
    """The q-th percentile latency (ms) of samples, or None if there are none."""
    return float(np.percentile([s.ms for s in samples], q)) if samples else None


def between(samples: list[Sample], t_a: float, t_b: float) -> list[Sample]:
    """Samples *sent* in [t_a, t_b) or still in flight at t_a."""
    return [s for s in samples if s.t0 < t_b and s.t1 >= t_a]

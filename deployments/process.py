"""What a replica reports about its own process: peak and current resident memory, and how long
it took from process start until the replica was ready (model loaded and warmed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _status_mb(field: str) -> float | None:
    """A `Vm*` line of /proc/self/status in MB (Linux only; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def process_age_s() -> float | None:
    """Seconds since this process started (from /proc; None where there is no /proc)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / _CLOCK_TICKS


class ReplicaClock:
    """Created at the top of a replica's constructor; `ready()` at its end."""

    def __init__(self):
        self.age_at_start = process_age_s()
        self._t0 = time.monotonic()
        self.ready_s: float | None = None
        self.load_s: float | None = None
        self.warmup_s: float | None = None  # the dummy forward's, if the replica runs a model

    def ready(self) -> None:
        self.load_s = time.monotonic() - self._t0
        self.ready_s = (self.age_at_start or 0.0) + self.load_s

    def stats(self) -> dict:
        """pid, VmHWM / VmRSS in MB, seconds from process start to ready, and of that the
        constructor's own time (model load + warm-up)."""
        return {"pid": os.getpid(), "vmhwm_mb": _status_mb("VmHWM"),
                "vmrss_mb": _status_mb("VmRSS"), "ready_s": self.ready_s,
                "constructor_s": self.load_s, "warmup_s": self.warmup_s}

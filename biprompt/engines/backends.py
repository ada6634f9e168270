"""Which runtime each role's engine runs on, chosen in one place: torch, onnxruntime, openvino, or
auto (the fastest of the three measured on this CPU; torch off the CPU or in another dtype).

`auto` builds every backend that can run here, times each on its role's own unit of work (one
full-size encoder forward, one one-point three-mask decode, one text mask), alternating rounds
after one untimed call each, and keeps the lowest median; the others are dropped. The choice, with
every timing, is in the engine's `backend_choice` (and so in a replica's `stats()`), and is
remembered in `backend-choices.json` beside the export cache, keyed by the role, a digest of the
weights, the CPU model, the thread count and the runtimes' versions: a replica that starts again
on the same kind of machine builds only the chosen backend instead of timing all three (an image
encoder at vit_b scale takes about 5 s a forward on 2 cores). Delete the file to measure again;
$BIPROMPT_BACKEND_CHOICES names another file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

import torch

from biprompt.engines.base import Placement
from biprompt.engines.exported import BACKENDS, check_backend, onnx_cache_dir, write_atomic

log = logging.getLogger(__name__)

CHOICES_FILE = "backend-choices.json"
CHOICES_ENV = "BIPROMPT_BACKEND_CHOICES"  # another file to remember choices in
ROUNDS = 5  # alternating timed rounds per backend
SLOW_ROUNDS = 3  # when one call takes longer than SLOW_MS
SLOW_MS = 500.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def choice_key(role: str, digest: str) -> str:
    versions = ",".join(f"{d}={_version(d)}" for d in ("torch", "onnxruntime", "openvino"))
    return f"{role}|{digest}|{cpu_name()}|threads={torch.get_num_threads()}|{versions}"


def _choices_path(cache: str | Path | None) -> Path:
    if os.environ.get(CHOICES_ENV):
        return Path(os.environ[CHOICES_ENV])
    return (Path(cache) if cache is not None else onnx_cache_dir()) / CHOICES_FILE


def read_choices(cache: str | Path | None = None) -> dict:
    try:
        data = json.loads(_choices_path(cache).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_choice(key: str, choice: dict, cache: str | Path | None = None) -> None:
    choices = read_choices(cache)
    choices[key] = choice
    try:
        write_atomic(_choices_path(cache), json.dumps(choices, indent=1, sort_keys=True).encode())
    except OSError as exc:
        log.warning("could not remember the backend choice (%s): measured again next time", exc)


def fastest(engines: list, rounds: int | None = None) -> tuple[object, dict]:
    """The engine with the lowest median `time_once()` (after one untimed call each; rounds
    alternate between engines, so load from elsewhere hits them alike), and the choice: the
    chosen backend and each backend's median ms."""
    first = {e.backend: e.time_once() for e in engines}
    if rounds is None:
        rounds = SLOW_ROUNDS if max(first.values()) > SLOW_MS else ROUNDS
    times: dict[str, list[float]] = {e.backend: [] for e in engines}
    for _ in range(rounds):
        for e in engines:
            times[e.backend].append(e.time_once())
    medians = {k: statistics.median(v) for k, v in times.items()}
    best = min(engines, key=lambda e: medians[e.backend])
    return best, {"chosen": best.backend, "rounds": rounds,
                  **{f"{k}_ms": round(v, 2) for k, v in medians.items()}}


def choose(role: str, backend: str, builders: Mapping[str, Callable[[], object]], *,
           device="cpu", dtype=None, digest: Callable[[], str] | None = None,
           cache_dir: str | Path | None = None, what: str | None = None):
    """The engine of `role` on `backend`, built by `builders[backend]()`; for `auto`, the fastest
    of the builders that succeed (torch only, off the CPU or in another dtype than float32).
    `digest()` (the weights' sha256) keys the remembered choice."""
    check_backend(backend, what or f"the {role} backend")
    if backend != "auto":
        return builders[backend]()
    place = Placement(device, dtype)
    if place.device.type != "cpu" or place.dtype != torch.float32:
        engine = builders["torch"]()
        engine.backend_choice = {"chosen": "torch", "reason": "the CPU runtimes run float32 on "
                                 f"the CPU; this engine runs {place.dtype} on {place.device}"}
        return engine
    key = choice_key(role, digest()) if digest is not None else None
    known = read_choices(cache_dir).get(key) if key else None
    if known and known.get("chosen") in builders:
        try:
            engine = builders[known["chosen"]]()
            engine.backend_choice = {**known, "remembered": True}
            log.info("%s backend auto: %s (remembered: %s)", role, engine.backend, known)
            return engine
        except Exception as exc:  # noqa: BLE001 - measure again below
            log.warning("%s backend auto: the remembered %s failed (%s); measuring again", role,
                        known["chosen"], exc)
    engines, failed = [], {}
    for name, build in builders.items():
        try:
            engines.append(build())
        except Exception as exc:  # noqa: BLE001 - a runtime that can't run here isn't a candidate
            log.warning("%s backend auto: %s unavailable (%s)", role, name, exc)
            failed[name] = str(exc)
    if not engines:
        raise RuntimeError(f"no {role} backend could be built: {failed}")
    best, choice = fastest(engines)
    choice["threads"] = torch.get_num_threads()  # measured at; a replica may change it later
    if failed:
        choice["failed"] = failed
    best.backend_choice = choice
    log.info("%s backend auto: %s (%s)", role, best.backend, choice)
    if key and not failed:
        remember_choice(key, choice, cache_dir)
    return best


__all__ = ["BACKENDS", "choose", "fastest", "read_choices", "remember_choice"]

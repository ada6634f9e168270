"""What every deployment shares: building its engine, the cache, metrics, timing, its stats."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import cache

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.metrics import Counter, Histogram

from biprompt.cache import Cached, make_store
from biprompt.engines import engine_from_profile
from deployments.process import ReplicaClock
from deployments.settings import AppArgs

log = logging.getLogger("biprompt.serve")

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
AGREEMENT_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]


def pack_bits(masks: np.ndarray) -> dict:
    """Bool masks at 1 bit a pixel for the trip to the selector: 8x fewer bytes to copy, and a
    small result travels inline with the reply instead of through Ray's object store."""
    m = np.asarray(masks, dtype=bool)
    return {"bits": np.packbits(m.reshape(-1)), "shape": m.shape}


def pack_rle(masks: np.ndarray) -> dict:
    """Bool masks (HxW, or KxHxW) as COCO RLE (pycocotools' C code), what the model replicas
    reply with: an object's mask is a few KB at any image size, where packed bits are h*w/8
    (128 KB a mask at 1024x1024)."""
    from pycocotools import mask as coco

    m = np.asarray(masks, dtype=bool)
    stack = m[None] if m.ndim == 2 else m
    rles = coco.encode(np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))
    return {"rle": rles, "shape": m.shape}


def unpack_bits(packed: dict) -> np.ndarray:
    """Masks from `pack_bits` or `pack_rle`."""
    shape = tuple(packed["shape"])
    if "rle" in packed:
        from pycocotools import mask as coco

        return coco.decode(packed["rle"]).transpose(2, 0, 1).astype(bool).reshape(shape)
    return np.unpackbits(packed["bits"], count=int(np.prod(shape))).view(bool).reshape(shape)


def build_engine(role: str, args: AppArgs):
    """This replica's engine, loading only its own weights. Every role reads the same profile,
    so model ids (and so cache keys) agree across deployments and replicas."""
    t = time.perf_counter()
    options = {"max_pixels": args.max_image_pixels} if role == "encoder" else {}
    engine = engine_from_profile(role, args.profile(), **options)
    log.info("loaded the %s engine (%s) in %.1f s", role, engine.model_id,
             time.perf_counter() - t)
    return engine


def chosen_again(engine, role: str, args: AppArgs, clock: ReplicaClock | None = None):
    """`engine`, or, when `auto` chose its backend at another thread count than the replica now
    runs with (a replica loads on Ray's one thread, then its user_config's torch_threads applies),
    the role's engine built, chosen and warmed up again at this count. The new choice is
    remembered too, so a later start on this machine builds the chosen one directly."""
    choice = getattr(engine, "backend_choice", None) or {}
    threads = choice.get("threads")
    if threads is None or threads == torch.get_num_threads():
        return engine
    log.info("the %s backend was chosen on %d threads; the replica runs %d: choosing again",
             role, threads, torch.get_num_threads())
    again = build_engine(role, args)
    warm_up(again, clock)
    return again


def warm_up(engine, clock: ReplicaClock | None = None) -> None:
    """One dummy forward before the replica takes traffic (lazy init, allocator, kernels): it
    runs in the constructor, and Serve counts a replica ready only once that returned. Its
    seconds go to `clock.warmup_s` (the replica's stats)."""
    warm = getattr(engine, "warmup", None)
    if warm is not None:
        t = time.perf_counter()
        with torch.no_grad():
            warm()
        took = time.perf_counter() - t
        if clock is not None:
            clock.warmup_s = took
        log.info("warmed up in %.2f s", took)


def replica_identity() -> dict:
    """This replica's Serve id and Ray node id (None outside a replica / a Ray worker): which
    replica answered, and where, when a deployment has several across nodes."""
    out = {"replica_id": None, "node_id": None}
    try:
        out["replica_id"] = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        pass
    try:
        out["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - Ray not initialised
        pass
    return out


def replica_stats(clock: ReplicaClock, engine=None, **counts) -> dict:
    """What a replica's `stats()` returns: its counters, torch threads, its process (peak and
    current RSS, time to ready), where it runs (replica and node id) and the model weights it
    holds (bytes by part)."""
    weights = engine.weights() if engine is not None and hasattr(engine, "weights") else {}
    describe = getattr(engine, "describe", None)
    return {**counts, "torch_threads": torch.get_num_threads(), "process": clock.stats(),
            **replica_identity(), "weights": weights, "gpu": gpu_stats(),
            "backend": describe() if describe else None}


def gpu_stats() -> dict | None:
    """This process's CUDA memory (MiB: peak and current allocated, reserved), or None when it
    has not used CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    mib = 2**20
    return {"device": torch.cuda.get_device_name(),
            "peak_mb": torch.cuda.max_memory_allocated() / mib,
            "allocated_mb": torch.cuda.memory_allocated() / mib,
            "reserved_mb": torch.cuda.memory_reserved() / mib}


@cache
def metrics() -> dict:
    """Created once per process (Ray exports them to Prometheus next to Serve's own)."""
    return {
        "cache": Counter("biprompt_cache_lookups", description="Cache lookups by kind and outcome "
                         "(hit, miss, corrupt) and Redis errors/skips while it is down.",
                         tag_keys=("kind", "outcome")),
        "encoder_images": Counter("biprompt_encoder_images", description="Images run through the "
                                  "SAM image encoder."),
        "text_pairs": Counter("biprompt_text_model_pairs", description="(image, text) pairs run "
                              "through BEiT-3 + EVF's decoder."),
        "decoder_prompts": Counter("biprompt_point_decoder_prompts", description="Point/box prompts "
                                   "decoded."),
        "batch": Histogram("biprompt_batch_size", description="Items per batched model call.",
                           boundaries=BATCH_BOUNDARIES, tag_keys=("role",)),
        "strategy": Counter("biprompt_selection", description="Selections by strategy.",
                            tag_keys=("strategy",)),
        "agreement": Histogram("biprompt_selection_agreement", description="IoU of the chosen "
                               "candidate with the text mask.", boundaries=AGREEMENT_BOUNDARIES),
    }


def cache_observer(what: str, outcome: str) -> None:
    try:
        metrics()["cache"].inc(tags={"kind": what, "outcome": outcome})
    except Exception:  # noqa: BLE001 - counting must never fail a request
        log.exception("could not count a cache %s %s", what, outcome)


def make_cache(args: AppArgs) -> Cached:
    store = make_store(args.cache_url, args.cache_ttl_s,
                       local_max_bytes=int(args.local_cache_mb * 2**20),
                       timeout_s=args.cache_timeout_s, observer=cache_observer)
    return Cached(store, cache_observer)


async def run_model(fn, *args):
    """Model calls run off the event loop so a replica keeps answering (health checks, batching)
    while torch works; torch releases the GIL."""
    t = time.perf_counter()
    out = await asyncio.to_thread(fn, *args)
    return out, (time.perf_counter() - t) * 1000.0


def configure_replica(batch_method, options: dict | None) -> None:
    """Apply a model deployment's `user_config`: batching (see configure_batching) and
    "torch_threads" (0: every core of the machine). Ray gives a replica with fractional
    `num_cpus` one OpenMP thread, which halves a CPU encoder on a 2-core machine."""
    configure_batching(batch_method, options)
    threads = (options or {}).get("torch_threads")
    if threads is not None:
        torch.set_num_threads(int(threads) or os.cpu_count() or 1)


def configure_batching(batch_method, options: dict | None) -> None:
    """Apply `user_config` {"max_batch_size", "batch_wait_timeout_s"} to a @serve.batch method."""
    if not options:
        return
    if "max_batch_size" in options:
        batch_method.set_max_batch_size(int(options["max_batch_size"]))
    if "batch_wait_timeout_s" in options:
        batch_method.set_batch_wait_timeout_s(float(options["batch_wait_timeout_s"]))

"""The soak's traffic: a locust user with a realistic mix of requests on ShapesRef scenes.

    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 60s --host URL

`benchmarks.soak` runs it as a subprocess (locust's gevent monkey-patching stays out of the Ray
driver) and reads what it records. Each user keeps the last few images it sent, as a person
clicking through a session does, and draws one task at a time by weight:

- cold: a never-seen scene, sent as a PNG (embedding and text mask both miss);
- click: a new point on a warm image, by `image_id`, with the clicked object's expression;
- repeat_text / new_text: a warm image by `image_id`, an expression it was asked before (the text
  mask is a cache hit) or one it was not (the text model runs);
- resend: a warm image's bytes again, as a client that drops `image_id` does (an embedding hit);
- batch: a new scene clicked twice plus warm images by `image_id`, in one /v1/segment/batch call;
- embed: a new scene precomputed by /v1/embed, clicked by `image_id` later.

A 503 (backpressure) is a deliberate answer, not a failure: it is marked a success under the name
"<name> [503]" and the user waits its Retry-After (at most 5 s) before the next task. Every request
is also appended to the JSONL file named by SOAK_RECORDS: start and end (epoch seconds), name,
status, latency, and the embedding / text-mask cache states of the reply (per item for a batch);
two more lines mark when the users started to spawn and when they were told to stop.

The client is locust's FastHttpUser (geventhttpclient): less CPU per request than the
requests-based HttpUser, on a machine whose cores the server needs. Scenes (240x320 to 480x640)
are drawn in the hub's native thread pool, two ahead of need: PNG encoding releases the GIL, so
drawing one stalls the other users' greenlets by a few ms at most, where inline it would stall
them 20-70 ms and their measured latencies would carry that. SOAK_SEED seeds the scenes;
SOAK_WAIT="lo,hi" sets each user's think time in seconds (default 0.5,2).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import gevent
import numpy as np
from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser

from biprompt.data.shapes_ref import generate_scene, sample_from_scene

SIZES = ((240, 320), (360, 480), (480, 640))  # (rows, columns) of a scene, drawn uniformly
POINTS_PER_OBJECT = 12  # distinct clicks drawn ahead per object; after those the last repeats
WARM_IMAGES = 8  # images a user keeps clicking on (the newest)
MAX_RETRY_AFTER_S = 5.0


@dataclass
class Shot:
    """One encoded scene: what a client holds of an image it sends and clicks on."""

    png: bytes
    image_id: str  # sha256 of the PNG bytes, as the server computes it
    expressions: list[str]  # one per object
    points: list[list[list[int]]]  # per object: unused [x, y] clicks on its silhouette
    asked: set[str] = field(default_factory=set)  # expressions this image was asked

    def click(self, rng: random.Random, target: int | None = None) -> dict:
        target = rng.randrange(len(self.expressions)) if target is None else target
        pts = self.points[target]
        point = pts.pop() if len(pts) > 1 else pts[0]
        self.asked.add(self.expressions[target])
        return {"points": [point], "text": self.expressions[target]}


def make_shot(seed: int) -> Shot:
    """Draw and encode one scene (runs in a native thread; nothing here touches gevent)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = SIZES[int(rng.integers(len(SIZES)))]
    scene = generate_scene(rng, h, w)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG", compress_level=1)
    png = buf.getvalue()
    points = [[list(sample_from_scene(scene, rng, target=i).point_index)
               for _ in range(POINTS_PER_OBJECT)] for i in range(len(scene.objects))]
    return Shot(png, hashlib.sha256(png).hexdigest(), list(scene.expressions), points)


class Shots:
    """Fresh scenes, `ahead` of them always being drawn in the hub's thread pool."""

    def __init__(self, seed: int, ahead: int = 2):
        self.seeds = np.random.SeedSequence(seed)
        self.pending: deque = deque()
        for _ in range(ahead):
            self._spawn()

    def _spawn(self) -> None:
        seed = int(self.seeds.spawn(1)[0].generate_state(1)[0])
        self.pending.append(gevent.get_hub().threadpool.spawn(make_shot, seed))

    def next(self) -> Shot:
        shot = self.pending.popleft().get()
        self._spawn()
        return shot


# --- recording ----------------------------------------------------------------------------------

_PATH = os.environ.get("SOAK_RECORDS")
_RECORDS = open(_PATH, "a", buffering=1) if _PATH else None  # open for the process's life


@events.request.add_listener
def record(name, response_time, response=None, context=None, exception=None, start_time=None,
           **_) -> None:
    if _RECORDS is None:
        return
    status = getattr(response, "status_code", 0) or 0
    start = start_time or time.time() - response_time / 1000
    row = {"t": start, "end": start + response_time / 1000, "name": name.split(" [")[0],
           "status": status, "ms": round(response_time, 3), **(context or {})}
    if exception is not None:
        row["error"] = str(exception)[:200]
    _RECORDS.write(json.dumps(row) + "\n")


@events.init.add_listener
def refresh_clock(**_) -> None:
    """NOTE: gevent timers count from the loop's cached time, which went stale while this file's
    imports (torch, through biprompt) ran; locust's --run-time timer would end the run that much
    early. Refresh it just before locust sets that timer."""
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def mark_start(**_) -> None:
    """When users start to spawn: the soak's time zero."""
    _mark("test_start")


@events.test_stopping.add_listener
def mark_stopping(**_) -> None:
    """When the run time is up and users are told to stop: the end of the soak's last window."""
    _mark("test_stopping")


def _mark(event: str) -> None:
    if _RECORDS is not None:
        _RECORDS.write(json.dumps({"event": event, "t": time.time()}) + "\n")


def _wait_bounds() -> tuple[float, float]:
    lo, hi = (float(v) for v in os.environ.get("SOAK_WAIT", "0.5,2").split(","))
    return lo, hi


# --- the user -----------------------------------------------------------------------------------


class SegmentUser(FastHttpUser):
    wait_time = between(*_wait_bounds())
    network_timeout = 120.0
    connection_timeout = 30.0
    _ids = iter(range(1_000_000))

    def on_start(self) -> None:
        n = next(SegmentUser._ids)
        seed = int(os.environ.get("SOAK_SEED", "0")) * 1000 + n
        self.rng = random.Random(seed)
        self.shots = Shots(seed)
        self.warm: deque[Shot] = deque(maxlen=WARM_IMAGES)

    # --- one request ----------------------------------------------------------------------------

    def _post(self, path: str, name: str, body: dict) -> dict | None:
        """POST `body`; the parsed reply of a 2xx, else None. Its cache states go into the
        request's context, which the request event hands to `record`."""
        reply, retry_after = None, None
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            ctx = resp.request_meta["context"]
            if resp.status_code == 503:
                resp.request_meta["name"] = f"{name} [503]"
                resp.success()
                retry_after = resp.headers.get("retry-after")
            elif 200 <= resp.status_code < 300:
                reply = _read(resp, ctx)
        if resp.status_code == 503:
            gevent.sleep(_retry_after(retry_after))
        return reply

    def _segment(self, kind: str, body: dict) -> dict | None:
        return self._post("/v1/segment", f"segment {kind}", body)

    def _image(self, shot: Shot) -> str:
        return base64.b64encode(shot.png).decode("ascii")

    def _pick_warm(self) -> Shot | None:
        return self.rng.choice(self.warm) if self.warm else None

    # --- tasks ----------------------------------------------------------------------------------

    @task(2)
    def cold(self) -> None:
        shot = self.shots.next()
        if self._segment("cold", {"image": self._image(shot), **shot.click(self.rng)}):
            self.warm.append(shot)

    @task(6)
    def click(self) -> None:
        shot = self._pick_warm()
        if shot is None:
            return self.cold()
        self._segment("click", {"image_id": shot.image_id, **shot.click(self.rng)})

    @task(2)
    def repeat_text(self) -> None:
        asked = [(s, i) for s in self.warm for i, e in enumerate(s.expressions) if e in s.asked]
        if not asked:
            return self.cold()
        shot, target = self.rng.choice(asked)
        self._segment("repeat_text", {"image_id": shot.image_id, **shot.click(self.rng, target)})

    @task(2)
    def new_text(self) -> None:
        fresh = [(s, i) for s in self.warm for i, e in enumerate(s.expressions)
                 if e not in s.asked]
        if not fresh:
            return self.cold()
        shot, target = self.rng.choice(fresh)
        self._segment("new_text", {"image_id": shot.image_id, **shot.click(self.rng, target)})

    @task(1)
    def resend(self) -> None:
        shot = self._pick_warm()
        if shot is None:
            return self.cold()
        self._segment("resend", {"image": self._image(shot), **shot.click(self.rng)})

    @task(1)
    def batch(self) -> None:
        shot = self.shots.next()
        items = [{"image": self._image(shot), **shot.click(self.rng)} for _ in range(2)]
        for warm in self.rng.sample(list(self.warm), min(2, len(self.warm))):
            items.append({"image_id": warm.image_id, **warm.click(self.rng)})
        reply = self._post("/v1/segment/batch", "batch", {"items": items})
        if reply and reply["results"][0]["status"] == 200:
            self.warm.append(shot)

    @task(1)
    def embed(self) -> None:
        shot = self.shots.next()
        if self._post("/v1/embed", "embed", {"image": self._image(shot)}):
            self.warm.append(shot)


def _read(resp, ctx: dict) -> dict | None:
    """A 2xx reply, parsed; its cache states (per item for a batch) go into `ctx`. A reply that
    is not JSON, or a batch with an item that failed other than by 503, marks the request failed."""
    try:
        reply = resp.json()
    except ValueError:
        resp.failure("reply is not JSON")
        return None
    if "results" in reply:
        items = reply["results"]
        ctx["items"] = [i["status"] for i in items]
        ctx["cache"] = [(i.get("result") or {}).get("cache") for i in items]
        ctx["text_cache"] = [(i.get("result") or {}).get("text_cache") for i in items]
        bad = [i["status"] for i in items if not 200 <= i["status"] < 300 and i["status"] != 503]
        if bad:
            resp.failure(f"batch items failed with {bad}")
    else:
        ctx["cache"], ctx["text_cache"] = reply.get("cache"), reply.get("text_cache")
    return reply


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return 1.0

"""The Ray Data stages of the offline batch (serving/offline.py): one callable class per role, each
building only its own engine (as a deployment replica does), and the selection join.

A row is one image, or one chunk of an image's items when it has many, and carries:

    image     the file's path (absolute; on a cluster, a path every node can read)
    items     JSON: that image's requests, as the requests file gave them ({"id", "points", ...})
    image_id  sha256 of the file's bytes; height, width: the image as displayed
    embedding SAM's embedding in the cache format (biprompt.cache: fp16 + header, never pickle),
              what the served encoder hands the point decoder and the text model; dropped by the
              last stage that reads it
    state     msgpack: one record per item, {"error": {...}} or what the item asks for; the point
              stage adds SAM's candidates ("masks" as packed bits, "scores")
    texts     msgpack: the text model's mask (packed bits) or error for each distinct text
    error     JSON: the image's own error (unreadable, too large, ...), "" when none

An item that fails (its image, its prompt, a model call) becomes an error record; nothing here
raises out of a batch, so one bad item never fails the job. The engines are built as the
deployments build theirs (deployments.common.build_engine) but not warmed up: a replica's dummy
forward buys a first request's latency, which a batch job doesn't need.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import msgpack
import numpy as np
import ray
import torch

from biprompt.cache import image_id as hash_image
from biprompt.cache import pack_embedding, unpack_embedding
from biprompt.images import decode_image_bytes
from deployments.common import build_engine, pack_bits
from deployments.isolation import isolated
from deployments.settings import AppArgs
from serving.offline_items import (
    error_line,
    error_record,
    item_state,
    prepare,
    read_image,
    result_line,
)

# --- counting -------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Tally:
    """Counts the stages report (images through the encoder, prompts decoded, text pairs): the
    job's own account of the work done, read by the driver at the end; and when each stage's
    last actor had loaded its model (wall-clock time)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.ready_at: dict[str, float] = {}

    def ready(self, role: str, at: float) -> None:
        self.ready_at[role] = max(at, self.ready_at.get(role, at))

    def ready_times(self) -> dict[str, float]:
        return dict(self.ready_at)

    def add(self, **counts: int) -> None:
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(n)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def set_threads(torch_threads: int) -> None:
    """0: every core. Ray gives a worker with fractional num_cpus one OpenMP thread."""
    torch.set_num_threads(int(torch_threads) or os.cpu_count() or 1)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def _columns(rows: list[dict], keys: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)


def _load(blob) -> object:
    return msgpack.unpackb(bytes(blob))


def _dump(obj) -> bytes:
    return msgpack.packb(obj)


# --- the role stages ------------------------------------------------------------------------


class EncoderStage:
    """Reads and decodes each image, checks its items' prompts, and runs SAM's image encoder once
    per image that has a valid item (one batched call per Ray Data batch)."""

    def __init__(self, args: AppArgs, tally, torch_threads: int = 0, chunk: int = 64):
        set_threads(torch_threads)
        self.args, self.tally, self.chunk = args, tally, max(1, int(chunk))
        self.engine = build_engine("encoder", args)
        ray.get(tally.ready.remote("encoder", time.time()))

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        t0, rows, todo = time.perf_counter(), [], []
        for src in _rows(batch):
            row = {"image": str(src["image"]), "items": json.loads(str(src["items"])),
                   "image_id": "", "height": 0, "width": 0, "embedding": b"", "state": [],
                   "error": ""}
            try:
                data = read_image(row["image"])
                row["image_id"] = hash_image(data)
                rgb, _ = decode_image_bytes(data, self.args.max_image_pixels)
                self.engine.check_input(rgb.shape[:2])
                row["height"], row["width"] = (int(d) for d in rgb.shape[:2])
                has_text = self.engine.text is not None
                row["state"] = [item_state(it, rgb.shape[:2], has_text) for it in row["items"]]
                if any("error" not in s for s in row["state"]):
                    todo.append((len(rows), rgb))
            except Exception as exc:  # noqa: BLE001 - the image's own error, on each item
                row["error"] = json.dumps(error_record(exc))
            rows.append(row)
        embs = isolated(self.engine.embed_rgb, [rgb for _, rgb in todo], "encoder")
        done = 0
        for (i, _), emb in zip(todo, embs, strict=True):
            if isinstance(emb, Exception):
                rows[i]["error"] = json.dumps(error_record(emb))
                continue
            done += 1
            emb.image_id = rows[i]["image_id"]
            rows[i]["embedding"] = pack_embedding(emb, self.args.embedding_dtype)
        out = []
        for row in rows:  # an image with many items goes on as several rows
            n = max(1, len(row["items"]))
            for k in range(0, n, self.chunk):
                out.append({**row, "items": json.dumps(row["items"][k:k + self.chunk]),
                            "state": _dump(row["state"][k:k + self.chunk])})
        ray.get(self.tally.add.remote(encoder_images=done, encoder_calls=int(bool(todo)),
                                      encoder_failed=len(todo) - done,
                                      encoder_busy_ms=_ms(t0)))
        return _columns(out, ("image", "items", "image_id", "height", "width", "embedding",
                              "state", "error"))


class PointStage:
    """SAM's prompt encoder and mask decoder: three candidates for each item with points or a
    box, one batched decoder call per image (and prompt shape)."""

    def __init__(self, args: AppArgs, tally, torch_threads: int = 0, keep_embedding: bool = True):
        set_threads(torch_threads)
        self.tally, self.keep_embedding = tally, keep_embedding
        self.engine = build_engine("points", args)
        ray.get(tally.ready.remote("points", time.time()))

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        t0, rows, decoded = time.perf_counter(), _rows(batch), 0
        for row in rows:
            state = _load(row["state"])
            idx = [i for i, s in enumerate(state) if s.get("points")]
            if row["error"] or not idx:
                row["state"] = _dump(state)
                continue
            items = json.loads(str(row["items"]))
            size = (int(row["height"]), int(row["width"]))
            try:
                emb = unpack_embedding(bytes(row["embedding"]), self.engine.model_id)
                prompts = [prepare(items[i], size)[0] for i in idx]
                results = isolated(lambda ps, emb=emb: self.engine.decode_points(emb, ps),
                                   prompts, "points")
            except Exception as exc:  # noqa: BLE001 - every item of this row
                results = [exc] * len(idx)
            for i, r in zip(idx, results, strict=True):
                if isinstance(r, Exception):
                    state[i] = {"error": error_record(r)}
                else:
                    decoded += 1
                    packed = pack_bits(r.masks)
                    state[i].update(masks=packed["bits"].tobytes(), shape=list(packed["shape"]),
                                    scores=[float(x) for x in r.scores])
            row["state"] = _dump(state)
        ray.get(self.tally.add.remote(decoder_prompts=decoded, points_busy_ms=_ms(t0)))
        keys = ["image", "items", "image_id", "height", "width", "state", "error"]
        return _columns(rows, keys + (["embedding"] if self.keep_embedding else []))


class TextStage:
    """BEiT-3 + EVF-SAM's decoder on the same embedding: one mask per distinct (image, text),
    batched across the batch's images `max_pairs` at a time."""

    def __init__(self, args: AppArgs, tally, torch_threads: int = 0, max_pairs: int = 16):
        set_threads(torch_threads)
        self.tally, self.max_pairs = tally, max(1, int(max_pairs))
        self.engine = build_engine("text", args)
        ray.get(tally.ready.remote("text", time.time()))

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        t0, rows = time.perf_counter(), _rows(batch)
        found: list[dict] = []
        pairs: list[tuple[int, str]] = []  # (row, text) to run
        embs: dict[int, object] = {}
        for r, row in enumerate(rows):
            texts: dict[str, dict] = {}
            found.append(texts)
            if row["error"]:
                continue
            wanted = sorted({s["text"] for s in _load(row["state"]) if s.get("text")})
            if not wanted:
                continue
            try:
                embs[r] = unpack_embedding(bytes(row["embedding"]), self.engine.sam_model_id)
            except Exception as exc:  # noqa: BLE001 - every text of this row
                texts.update({t: {"error": error_record(exc)} for t in wanted})
                continue
            for t in wanted:
                try:  # checked one by one: an over-long text fails alone
                    self.engine.validate(t)
                    pairs.append((r, t))
                except Exception as exc:  # noqa: BLE001
                    texts[t] = {"error": error_record(exc)}
        done = 0
        for k in range(0, len(pairs), self.max_pairs):
            chunk = pairs[k:k + self.max_pairs]
            masks = isolated(lambda ps: self.engine.text_masks([embs[r] for r, _ in ps],
                                                                [t for _, t in ps]),
                             chunk, "text")
            for (r, t), m in zip(chunk, masks, strict=True):
                if isinstance(m, Exception):
                    found[r][t] = {"error": error_record(m)}
                else:
                    done += 1
                    packed = pack_bits(m)
                    found[r][t] = {"bits": packed["bits"].tobytes(), "shape": list(packed["shape"])}
        for row, texts in zip(rows, found, strict=True):
            row["texts"] = _dump(texts)
        ray.get(self.tally.add.remote(text_pairs=done, text_busy_ms=_ms(t0)))
        return _columns(rows, ("image", "items", "image_id", "height", "width", "state", "texts",
                               "error"))


# --- selection ------------------------------------------------------------------------------


class SelectStage:
    """The join (biprompt.join, as the Selector deployment calls it) and the output lines: CPU
    only, an actor pool like the others so that it starts with them."""

    def __init__(self, args: AppArgs, tally, torch_threads: int = 1):
        set_threads(torch_threads)
        self.tally, self.threshold = tally, float(args.agreement_threshold)
        ray.get(tally.ready.remote("select", time.time()))

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = select_batch(batch, self.threshold)
        ray.get(self.tally.add.remote(select_busy_ms=_ms(t0)))
        return out


def select_batch(batch: dict, threshold: float) -> dict[str, np.ndarray]:
    """Rows of images -> one output line (JSON) per item."""
    lines = []
    for row in _rows(batch):
        row = {**row, "image": str(row["image"]), "image_id": str(row["image_id"])}
        items = json.loads(str(row["items"]))
        image_error = json.loads(str(row["error"])) if row["error"] else None
        state = _load(row["state"]) if not image_error else [{}] * len(items)
        texts = _load(row["texts"]) if "texts" in row and not image_error else {}
        for item, s in zip(items, state, strict=True):
            rid = str(item["id"])
            try:
                if image_error or "error" in s:
                    line = error_line(rid, row["image"], image_error or s["error"])
                else:
                    line = result_line(rid, row, s, texts, threshold)
            except Exception as exc:  # noqa: BLE001 - this item's own error
                line = error_line(rid, row["image"], error_record(exc))
            lines.append({"id": rid, "ok": line["ok"], "line": json.dumps(line)})
    return _columns(lines, ("id", "ok", "line"))

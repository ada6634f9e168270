"""The embedding cache: one SAM encoder pass per image, shared by every later click, text, request
and replica; and the text-mask cache, so repeated words skip BEiT-3.

Keys: model id + preprocessing version + sha256 of the image bytes (text masks add the text
model's id and the text's sha256). Values: never pickle. A value is

    b"BPC1" | uint32 LE header length | msgpack header | raw array bytes

where the header names each array's dtype, shape, offset and length, the model id and sizes. A
value that is truncated, mislabelled or made by another model is a miss, never an error.

Two stores, one interface (`get`, `set`, both async):
- `RedisStore`: shared. Short timeouts and no retries: Redis down or slow means a miss (logged,
  counted through `observer`), and after a failure Redis is skipped for `cooldown_s` so a dead
  server doesn't add a timeout to every request; then it is tried again and caching resumes.
- `LocalStore`: an in-process LRU bounded in bytes, with TTL. The embedded default.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from biprompt.config import CACHE_TIMEOUT_S, CACHE_TTL_S, LOCAL_CACHE_MB, REDIS_COOLDOWN_S
from biprompt.preprocess import PREPROCESS_VERSION
from biprompt.types import ImageEmbedding

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"BPC1"
_PREFIX = struct.Struct("<4sI")
_DTYPES = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}

Observer = Callable[[str, str], None]  # (what, outcome), e.g. ("embedding", "hit")
HEADER_READ = 4096  # bytes read for an embedding's header (it is a few hundred)


class CacheFormatError(ValueError):
    """A cached value we can't trust: treated as a miss."""


def image_id(data: bytes) -> str:
    """The public id of an image: sha256 of its encoded bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def embedding_key(model_id: str, img_id: str) -> str:
    return f"biprompt:v{FORMAT_VERSION}:emb:{model_id}:p{PREPROCESS_VERSION}:{img_id}"


def text_mask_key(sam_id: str, text_id: str, img_id: str, text: str) -> str:
    digest = hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:32]
    # "txr": the value is COCO RLE (`pack_mask_rle`); "txt" keys held packed bits
    return f"biprompt:v{FORMAT_VERSION}:txr:{text_id}:{sam_id}:p{PREPROCESS_VERSION}:{img_id}:{digest}"


def reference_key(sam_id: str, ref_model_id: str, annotation: str) -> str:
    """A reference's features (biprompt.engines.reference_mask.annotation_key names the
    reference image and its annotation)."""
    return f"biprompt:v{FORMAT_VERSION}:ref:{ref_model_id}:{sam_id}:p{PREPROCESS_VERSION}:{annotation}"


def reference_mask_key(sam_id: str, ref_model_id: str, img_id: str, annotation: str) -> str:
    """The reference expert's mask (COCO RLE) on one target image for one reference."""
    return (f"biprompt:v{FORMAT_VERSION}:rfr:{ref_model_id}:{sam_id}:p{PREPROCESS_VERSION}:"
            f"{img_id}:{annotation}")


def logits_key(sam_id: str, logits_id: str) -> str:
    return f"biprompt:v{FORMAT_VERSION}:logits:{sam_id}:{logits_id}"


# --- values ---------------------------------------------------------------------------------


def pack(kind: str, arrays: dict[str, np.ndarray], **meta) -> bytes:
    specs, chunks, offset = [], [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _DTYPES:
            raise ValueError(f"cannot cache {arr.dtype} arrays")
        specs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                      "offset": offset, "nbytes": arr.nbytes})
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    header = msgpack.packb({"v": FORMAT_VERSION, "kind": kind, "arrays": specs, **meta})
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *chunks])


def unpack(blob: bytes, kind: str, copy: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (header, arrays). Arrays are writable copies (read-only views of `blob` with
    copy=False, enough to validate a value). Raises CacheFormatError."""
    try:
        magic, n = _PREFIX.unpack_from(blob)
        if magic != MAGIC:
            raise CacheFormatError("bad magic")
        header = msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + n])
        if header.get("v") != FORMAT_VERSION or header.get("kind") != kind:
            raise CacheFormatError(f"format {header.get('v')}/{header.get('kind')}, want {kind}")
        body = memoryview(blob)[_PREFIX.size + n :]
        arrays, total = {}, 0
        for s in header["arrays"]:
            dtype = np.dtype(_DTYPES[s["dtype"]])
            count = int(np.prod(s["shape"], dtype=np.int64))
            if count * dtype.itemsize != s["nbytes"] or s["offset"] + s["nbytes"] > len(body):
                raise CacheFormatError(f"array {s['name']} does not fit the value")
            raw = body[s["offset"] : s["offset"] + s["nbytes"]]
            arr = np.frombuffer(raw, dtype=dtype).reshape(s["shape"])
            arrays[s["name"]] = arr.copy() if copy else arr
            total += s["nbytes"]
        if total != len(body):
            raise CacheFormatError(f"{len(body) - total} stray bytes after the arrays")
    except CacheFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a corrupt value
        raise CacheFormatError(f"unreadable value: {exc}") from exc
    return header, arrays


def pack_embedding(emb: ImageEmbedding, dtype: str = "float16", **meta) -> bytes:
    """The embedding in `dtype` (float16 halves transport and cache; float32 is lossless) and the
    text model's view in float32 (small; keeps text masks exactly the in-process ones)."""
    arrays = {"embedding": emb.embedding.detach().to(torch.float32).cpu().numpy().astype(dtype)}
    if emb.beit_image is not None:
        arrays["beit_image"] = emb.beit_image.detach().to(torch.float32).cpu().numpy()
    return pack("embedding", arrays, model_id=emb.model_id, original_size=list(emb.original_size),
                input_size=list(emb.input_size), image_id=emb.image_id, **meta)


def embedding_header(blob: bytes) -> dict:
    """The header alone (sizes, model id): what the ingress needs to validate prompts."""
    return unpack_header(blob, "embedding")


def unpack_header(blob: bytes, kind: str) -> dict:
    try:
        magic, n = _PREFIX.unpack_from(blob)
        header = msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + n])
    except Exception as exc:  # noqa: BLE001
        raise CacheFormatError(f"unreadable header: {exc}") from exc
    if (magic != MAGIC or not isinstance(header, dict) or header.get("v") != FORMAT_VERSION
            or header.get("kind") != kind):
        raise CacheFormatError(f"not a {kind} value")
    return header


def _embedding_parts(blob: bytes, model_id: str | None, copy: bool) -> tuple[dict, dict]:
    header, arrays = unpack(blob, "embedding", copy)
    if model_id is not None and header.get("model_id") != model_id:
        raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
    if "embedding" not in arrays or arrays["embedding"].ndim != 4:
        raise CacheFormatError("no 4-d embedding")
    try:
        sizes = {k: tuple(int(v) for v in header[k]) for k in ("original_size", "input_size")}
        if not isinstance(header["model_id"], str) or any(len(v) != 2 for v in sizes.values()):
            raise ValueError("model_id or sizes")
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFormatError(f"bad embedding header: {exc!r}") from exc
    return {**header, **sizes}, arrays


def check_embedding(blob: bytes, model_id: str | None = None) -> dict:
    """Validate a value without copying its arrays; -> its header. Raises CacheFormatError."""
    return _embedding_parts(blob, model_id, copy=False)[0]


def unpack_embedding(blob: bytes, model_id: str | None = None) -> ImageEmbedding:
    header, arrays = _embedding_parts(blob, model_id, copy=True)
    beit = arrays.get("beit_image")
    return ImageEmbedding(
        embedding=torch.from_numpy(arrays["embedding"]),
        original_size=header["original_size"],
        input_size=header["input_size"],
        model_id=header["model_id"],
        beit_image=None if beit is None else torch.from_numpy(beit),
        image_id=header.get("image_id"),
    )


def pack_mask(mask: np.ndarray, model_id: str) -> bytes:
    m = np.asarray(mask, dtype=bool)
    return pack("mask", {"bits": np.packbits(m.reshape(-1))}, shape=list(m.shape), model_id=model_id)


def unpack_mask(blob: bytes, model_id: str | None = None) -> np.ndarray:
    header, arrays = unpack(blob, "mask")
    if model_id is not None and header.get("model_id") != model_id:
        raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
    shape = header.get("shape")
    bits = arrays.get("bits")
    if bits is None or not isinstance(shape, list) or len(shape) != 2:
        raise CacheFormatError("not a 2-d mask")
    try:
        h, w = int(shape[0]), int(shape[1])
    except (TypeError, ValueError) as exc:
        raise CacheFormatError(f"bad mask shape {shape!r}") from exc
    if min(h, w) < 0 or bits.dtype != np.uint8 or bits.shape != ((h * w + 7) // 8,):
        raise CacheFormatError("mask bits do not match its shape")
    return np.unpackbits(bits, count=h * w).astype(bool).reshape(h, w)


def pack_mask_rle(rle: dict, model_id: str) -> bytes:
    """A mask as COCO RLE ({"size": [h, w], "counts": bytes | str}, as pycocotools writes it):
    a few KB for an object's mask at any image size, where packed bits are h*w/8."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    h, w = (int(v) for v in rle["size"])
    return pack("mask_rle", {"counts": np.frombuffer(counts, dtype=np.uint8)}, size=[h, w],
                model_id=model_id)


def unpack_mask_rle(blob: bytes, model_id: str | None = None) -> dict:
    """-> {"size": [h, w], "counts": bytes}, checked to decode to an h x w mask."""
    header, arrays = unpack(blob, "mask_rle")
    if model_id is not None and header.get("model_id") != model_id:
        raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
    size, counts = header.get("size"), arrays.get("counts")
    if counts is None or counts.ndim != 1 or not isinstance(size, list) or len(size) != 2:
        raise CacheFormatError("not an RLE mask")
    rle = {"size": [int(size[0]), int(size[1])], "counts": counts.tobytes()}
    try:
        from pycocotools import mask as coco

        if int(coco.area(rle)) > rle["size"][0] * rle["size"][1]:
            raise ValueError("more pixels than the mask has")
    except Exception as exc:  # noqa: BLE001 - undecodable counts: a corrupt value
        raise CacheFormatError(f"bad RLE counts: {exc}") from exc
    return rle


def pack_logits(logits: np.ndarray, model_id: str, img_id: str) -> bytes:
    """An answer's LxL low-res logits (float16) for the next refinement click on `img_id`."""
    return pack("logits", {"logits": np.asarray(logits, dtype=np.float16)}, model_id=model_id,
                image_id=img_id)


def unpack_logits(blob: bytes, model_id: str) -> tuple[np.ndarray, str | None]:
    """-> (LxL float32 logits, the image id they belong to)."""
    header, arrays = unpack(blob, "logits")
    if header.get("model_id") != model_id:
        raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
    logits = arrays.get("logits")
    if logits is None or logits.ndim != 2:
        raise CacheFormatError("not 2-d logits")
    return logits.astype(np.float32), header.get("image_id")


# --- stores ---------------------------------------------------------------------------------


def _ignore(what: str, outcome: str) -> None:
    pass


class LocalStore:
    """In-process LRU bounded by total bytes, with a TTL. Not shared between processes."""

    shared = False

    def __init__(self, max_bytes: int = LOCAL_CACHE_MB * 2**20, ttl_s: float | None = CACHE_TTL_S,
                 observer: Observer | None = None):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.observer = observer or _ignore
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def describe(self) -> str:
        return f"local LRU ({self._bytes}/{self.max_bytes} bytes, {len(self._items)} entries)"

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires and time.monotonic() > expires:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    async def head(self, key: str, n: int) -> tuple[bytes, int] | None:
        """The value's first `n` bytes (a header) and its whole length, or None."""
        value = await self.get(key)
        return None if value is None else (value[:n], len(value))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """True once stored (False: larger than the whole cache)."""
        if len(value) > self.max_bytes:
            return False
        if key in self._items:
            self._drop(key)
        ttl_s = ttl_s or self.ttl_s
        expires = time.monotonic() + ttl_s if ttl_s else 0.0
        self._items[key] = (expires, value)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    async def delete(self, key: str) -> None:
        if key in self._items:
            self._drop(key)

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self._bytes -= len(value)

    async def ping(self) -> bool:
        return True


class RedisStore:
    """Redis with short timeouts, no retries, and a cool-down after a failure."""

    shared = True

    def __init__(self, url: str, ttl_s: float | None = CACHE_TTL_S,
                 timeout_s: float = CACHE_TIMEOUT_S, cooldown_s: float = REDIS_COOLDOWN_S,
                 observer: Observer | None = None):
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.ttl_s, self.cooldown_s = url, ttl_s, cooldown_s
        self.observer = observer or _ignore
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
        )
        self._down_until = 0.0

    def describe(self) -> str:
        state = "down, skipped" if self._skipping() else "up"
        return f"redis {self._safe_url()} ({state})"

    def _safe_url(self) -> str:
        # never log a password
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def _skipping(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, op: str, exc: Exception) -> None:
        if not self._skipping():
            log.warning("redis %s failed (%s: %s); serving without the cache for %.1f s",
                        op, type(exc).__name__, exc, self.cooldown_s)
        self._down_until = time.monotonic() + self.cooldown_s
        self.observer("redis", "error")

    async def _call(self, op: str, coro_fn):
        if self._skipping():
            self.observer("redis", "skipped")
            return None
        try:
            return await coro_fn()
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the cache must never fail a request
            self._failed(op, exc)
            await self._drop_connections()
            return None

    async def _drop_connections(self) -> None:
        """After a failure every pooled connection may be dead (Redis restarted): drop them
        all, so the first requests after the cool-down don't each fail once on a stale one."""
        try:
            await self._client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - closing dead sockets may itself fail
            log.debug("closing the redis pool failed", exc_info=True)

    async def get(self, key: str) -> bytes | None:
        return await self._call("GET", lambda: self._client.get(key))

    async def head(self, key: str, n: int) -> tuple[bytes, int] | None:
        """The value's first `n` bytes and its whole length (GETRANGE and STRLEN in one round
        trip: a header without the arrays), or None."""
        async def both():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.getrange(key, 0, n - 1)
                pipe.strlen(key)
                return await pipe.execute()

        out = await self._call("GETRANGE", both)
        if not out or not out[0]:  # GETRANGE answers b"" for a missing key
            return None
        return bytes(out[0]), int(out[1])

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """True once Redis stored it (False: Redis down, skipped or slow)."""
        ttl_s = ttl_s or self.ttl_s
        ex = int(ttl_s) if ttl_s else None
        return bool(await self._call("SET", lambda: self._client.set(key, value, ex=ex)))

    async def delete(self, key: str) -> None:
        await self._call("DEL", lambda: self._client.delete(key))

    async def ping(self) -> bool:
        return bool(await self._call("PING", self._client.ping))


def make_store(url: str | None, ttl_s: float | None = CACHE_TTL_S, *,
               local_max_bytes: int = LOCAL_CACHE_MB * 2**20,
               timeout_s: float = CACHE_TIMEOUT_S, observer: Observer | None = None) -> LocalStore | RedisStore:
    """`url` None or "" or "local": the in-process LRU; "redis://..." / "rediss://...": Redis."""
    if not url or url == "local":
        return LocalStore(local_max_bytes, ttl_s, observer)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"cache url {url!r}: use redis://host:port/db, or leave it empty for "
                         "the in-process cache")
    return RedisStore(url, ttl_s, timeout_s, observer=observer)


@dataclass
class Cached:
    """Typed access to a store: embeddings and text masks, corrupt values as misses."""

    store: LocalStore | RedisStore
    observer: Observer = _ignore

    async def get_embedding_blob(self, key: str, model_id: str) -> bytes | None:
        """The raw value, checked (header, sizes, model id) but not decoded."""
        blob = await self.store.get(key)
        if blob is not None:
            try:
                check_embedding(blob, model_id)
            except CacheFormatError as exc:
                log.warning("dropping corrupt cache entry %s: %s", key, exc)
                self.observer("embedding", "corrupt")
                await self.store.delete(key)
                blob = None
        self.observer("embedding", "miss" if blob is None else "hit")
        return blob

    async def get_embedding_header(self, key: str, model_id: str,
                                   first: int = HEADER_READ) -> dict | None:
        """The embedding's header alone (sizes, model id, image id), read without its arrays
        (a few hundred bytes where the value is MBs); None when it isn't cached. The arrays are
        checked by whoever reads them (a replica), so a value corrupt past its header is found
        there."""
        found = await self.store.head(key, first)
        header = None
        if found is not None:
            head, total = found
            try:
                _, n = _PREFIX.unpack_from(head)
                if _PREFIX.size + n > len(head) and n < 2**20:
                    head = (await self.store.head(key, _PREFIX.size + n) or (head, total))[0]
                header = unpack_header(head, "embedding")
                if header.get("model_id") != model_id:
                    raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
                body = sum(int(a["nbytes"]) for a in header["arrays"])
                if _PREFIX.size + n + body != total:  # truncated or padded: corrupt
                    raise CacheFormatError(f"{total} bytes where the header says "
                                           f"{_PREFIX.size + n + body}")
                header["original_size"] = [int(v) for v in header["original_size"]][:2]
                header["input_size"] = [int(v) for v in header["input_size"]][:2]
            except (CacheFormatError, struct.error, KeyError, TypeError, ValueError) as exc:
                log.warning("dropping corrupt cache entry %s: %s", key, exc)
                self.observer("embedding", "corrupt")
                await self.store.delete(key)
                header = None
        self.observer("embedding", "miss" if header is None else "hit")
        return header

    async def get_mask_rle(self, key: str, model_id: str, what: str = "text_mask") -> dict | None:
        """A cached expert mask (text or reference) as COCO RLE, or None."""
        blob = await self.store.get(key)
        rle = None
        if blob is not None:
            try:
                rle = unpack_mask_rle(blob, model_id)
            except CacheFormatError as exc:
                log.warning("dropping corrupt cache entry %s: %s", key, exc)
                self.observer(what, "corrupt")
                await self.store.delete(key)
        self.observer(what, "miss" if rle is None else "hit")
        return rle

    async def get_mask(self, key: str, model_id: str) -> np.ndarray | None:
        blob = await self.store.get(key)
        mask = None
        if blob is not None:
            try:
                mask = unpack_mask(blob, model_id)
            except CacheFormatError as exc:
                log.warning("dropping corrupt cache entry %s: %s", key, exc)
                self.observer("text_mask", "corrupt")
                await self.store.delete(key)
        self.observer("text_mask", "miss" if mask is None else "hit")
        return mask

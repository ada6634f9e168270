"""HTTP clients for the v1 API: `BiPromptClient` (blocking) and `AsyncBiPromptClient` (asyncio).

Both speak msgpack by default (raw bytes, no base64) and fall back to JSON when the server
answers 415 or sends msgpack they can't read; both retry connection errors, timeouts, 408, 429,
502, 503 and 504 with exponential backoff and full jitter (or the server's Retry-After), and a 500
that lacks the server's error body (Serve's proxy answering for an Ingress replica that died
under the request; the app's own 500s carry the body and are not retried).
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx
from tqdm.auto import tqdm

from ._base import BaseClient, Plan, Retry, Wire, is_not_found
from .images import ImageInput, load_image_bytes
from .results import BatchError, Segmentation

__all__ = ["AsyncBiPromptClient", "BiPromptClient"]

DEFAULT_URL = "http://127.0.0.1:8000"
Result = Segmentation | BatchError


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="item" if desc == "segment" else "image",
                disable=not progress or total == 0, leave=desc == "segment")


def _report_done(plan: Plan, todo: list[int], on_result) -> None:
    """Items settled before the segment phase (their image failed to embed)."""
    if on_result is None:
        return
    pending = set(todo)
    for i, r in enumerate(plan.results):
        if i not in pending and r is not None:
            on_result(i, r)


def _segment_args(image: ImageInput | None, **kwargs: Any) -> dict[str, Any]:
    return {"image": image, **kwargs}


class BiPromptClient(BaseClient):
    """Blocking client. Thread-safe; use as a context manager or call `close()`.

    `sleep` and `rng` replace `time.sleep` and the backoff's random source (for tests).
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, wire: Wire = "msgpack",
                 transport: httpx.BaseTransport | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 8.0, *, sleep: Callable[[float], Any] | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, wire, backoff_base,
                         backoff_max, rng)
        self._sleep: Callable[[float], Any] = sleep or time.sleep
        self._http = httpx.Client(**self._client_kwargs(transport))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BiPromptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        attempt, switched = 0, False
        while True:
            content, headers = self._prepare(payload)
            try:
                resp = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                outcome = self._transport_outcome(exc, attempt)
            else:
                outcome = self._response_outcome(resp, attempt, switched)
            if not isinstance(outcome, Retry):
                return outcome
            if outcome.fallback:
                switched = True
                continue
            self._sleep(outcome.delay)
            attempt += 1

    # --- endpoints --------------------------------------------------------------------------

    def segment(self, image: ImageInput | None = None, *, image_id: str | None = None,
                points: Sequence[Sequence[float]] | None = None,
                labels: Sequence[int] | None = None, box: Sequence[float] | None = None,
                text: str | None = None, mode: str = "biprompt", mask_format: str = "rle",
                return_candidates: bool = False, return_text_mask: bool = False,
                mask_input_id: str | None = None, mask_input: Any = None,
                logits: str = "none", multimask: bool | None = None,
                reference: Mapping[str, Any] | None = None,
                return_expert_masks: bool = False) -> Segmentation:
        """Segment one object; give `image` (path, bytes, PIL image, array) or `image_id`.

        `reference`: an annotated reference image, a third expert ("things like this one"):
        {"image" or "image_id", and "mask" (HxW bool or COCO RLE) or "points"/"labels" and/or
        "box"}; mode "reference" answers with its mask.

        Refinement: send every click so far (`labels` 1 positive, 0 negative) with the previous
        answer's `mask_input_id=prev.logits_id` (ask for it with `logits="id"`), or its
        `mask_input=prev.logits` (with `logits="raw"`)."""
        payload = self._segment_payload(_segment_args(
            image, image_id=image_id, points=points, labels=labels, box=box, text=text,
            mode=mode, mask_format=mask_format, return_candidates=return_candidates,
            return_text_mask=return_text_mask, mask_input_id=mask_input_id,
            mask_input=mask_input, logits=None if logits == "none" else logits,
            multimask=multimask, reference=reference,
            return_expert_masks=return_expert_masks or None))
        return Segmentation.from_response(self._request("POST", "/v1/segment", payload))

    def embed_info(self, image: ImageInput) -> dict[str, Any]:
        """Embed an image on the server; the full EmbedResponse."""
        return self._request("POST", "/v1/embed", {"image": load_image_bytes(image)})

    def embed(self, image: ImageInput) -> str:
        """Embed an image on the server; its image_id, for later segment(image_id=...)."""
        return str(self.embed_info(image)["image_id"])

    def segment_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Result]:
        """Many segment requests in one POST /v1/segment/batch; results in input order."""
        payloads, results = self._batch_prepare(requests)
        body = self._request("POST", "/v1/segment/batch", {"items": payloads}) if payloads else None
        return self._batch_merge(body, results)

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    # --- segment_many -----------------------------------------------------------------------

    def segment_many(self, requests: Iterable[Mapping[str, Any]], concurrency: int = 8,
                     progress: bool = True,
                     on_result: Callable[[int, Result], Any] | None = None) -> list[Result]:
        """Run many segment requests concurrently (threads); results in input order, a
        BatchError for each failed item. Each image used by several items is uploaded and
        embedded once, then referenced by image_id. Stats go to `last_batch_stats`.
        `on_result(index, result)` is called as each item finishes (e.g. to stream to a file)."""
        t0 = time.perf_counter()
        reqs = list(requests)
        plan = self._plan(reqs)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            keys = plan.to_embed()
            with _bar(len(keys), "embed", progress) as bar:
                for fut in as_completed([pool.submit(self._embed_key, plan, k) for k in keys]):
                    fut.result()
                    bar.update()
            todo = [i for i, r in enumerate(plan.results) if r is None]
            with _bar(len(reqs), "segment", progress) as bar:
                _report_done(plan, todo, on_result)
                bar.update(len(reqs) - len(todo))
                futures = {pool.submit(self._run_item, plan, i): i for i in todo}
                for fut in as_completed(futures):
                    i = futures[fut]
                    plan.results[i] = fut.result()
                    if on_result is not None:
                        on_result(i, plan.results[i])
                    bar.update()
        self.last_batch_stats = plan.stats(time.perf_counter() - t0)
        return [r for r in plan.results if r is not None]

    def _embed_key(self, plan: Plan, key: str) -> None:
        try:
            self._note_embed(plan, key, self._request("POST", "/v1/embed",
                                                      {"image": plan.images[key]}))
        except Exception as exc:  # reported on each item of this image
            self._note_embed(plan, key, exc)

    def _run_item(self, plan: Plan, i: int) -> Result:
        failed = self._embed_failed(plan, i)
        if failed is not None:
            return failed
        first, resend = plan.payloads(i)
        try:
            try:
                return Segmentation.from_response(self._request("POST", "/v1/segment", first))
            except Exception as exc:
                if resend is None or not is_not_found(exc):
                    raise
            with plan.lock:  # the embedding was evicted: send the image itself, once
                plan.resends += 1
            return Segmentation.from_response(self._request("POST", "/v1/segment", resend))
        except Exception as exc:  # one failed item must not stop the others
            return BatchError(exc, index=i)


class AsyncBiPromptClient(BaseClient):
    """asyncio client; use `async with` or `await close()`. Same methods as BiPromptClient.

    `sleep` replaces `asyncio.sleep` (it may return an awaitable or not).
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, wire: Wire = "msgpack",
                 transport: httpx.AsyncBaseTransport | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 8.0, *,
                 sleep: Callable[[float], Awaitable[Any] | Any] | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, wire, backoff_base,
                         backoff_max, rng)
        self._sleep: Callable[[float], Any] = sleep or asyncio.sleep
        self._http = httpx.AsyncClient(**self._client_kwargs(transport))

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncBiPromptClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        attempt, switched = 0, False
        while True:
            content, headers = self._prepare(payload)
            try:
                resp = await self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                outcome = self._transport_outcome(exc, attempt)
            else:
                outcome = self._response_outcome(resp, attempt, switched)
            if not isinstance(outcome, Retry):
                return outcome
            if outcome.fallback:
                switched = True
                continue
            slept = self._sleep(outcome.delay)
            if inspect.isawaitable(slept):
                await slept
            attempt += 1

    async def segment(self, image: ImageInput | None = None, *, image_id: str | None = None,
                      points: Sequence[Sequence[float]] | None = None,
                      labels: Sequence[int] | None = None, box: Sequence[float] | None = None,
                      text: str | None = None, mode: str = "biprompt", mask_format: str = "rle",
                      return_candidates: bool = False, return_text_mask: bool = False,
                      mask_input_id: str | None = None, mask_input: Any = None,
                      logits: str = "none", multimask: bool | None = None,
                      reference: Mapping[str, Any] | None = None,
                      return_expert_masks: bool = False) -> Segmentation:
        payload = self._segment_payload(_segment_args(
            image, image_id=image_id, points=points, labels=labels, box=box, text=text,
            mode=mode, mask_format=mask_format, return_candidates=return_candidates,
            return_text_mask=return_text_mask, mask_input_id=mask_input_id,
            mask_input=mask_input, logits=None if logits == "none" else logits,
            multimask=multimask, reference=reference,
            return_expert_masks=return_expert_masks or None))
        return Segmentation.from_response(await self._request("POST", "/v1/segment", payload))

    async def embed_info(self, image: ImageInput) -> dict[str, Any]:
        return await self._request("POST", "/v1/embed", {"image": load_image_bytes(image)})

    async def embed(self, image: ImageInput) -> str:
        return str((await self.embed_info(image))["image_id"])

    async def segment_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[Result]:
        payloads, results = self._batch_prepare(requests)
        body = (await self._request("POST", "/v1/segment/batch", {"items": payloads})
                if payloads else None)
        return self._batch_merge(body, results)

    async def models(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/models")

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/healthz")

    async def segment_many(self, requests: Iterable[Mapping[str, Any]], concurrency: int = 8,
                           progress: bool = True,
                           on_result: Callable[[int, Result], Any] | None = None) -> list[Result]:
        """As BiPromptClient.segment_many, with at most `concurrency` calls in flight."""
        t0 = time.perf_counter()
        reqs = list(requests)
        plan = self._plan(reqs)
        sem = asyncio.Semaphore(max(1, concurrency))
        keys = plan.to_embed()

        with _bar(len(keys), "embed", progress) as bar:
            async def embed_one(key: str) -> None:
                async with sem:
                    try:
                        info = await self._request("POST", "/v1/embed",
                                                   {"image": plan.images[key]})
                        self._note_embed(plan, key, info)
                    except Exception as exc:  # reported on each item of this image
                        self._note_embed(plan, key, exc)
                bar.update()

            await asyncio.gather(*(embed_one(k) for k in keys))

        todo = [i for i, r in enumerate(plan.results) if r is None]
        with _bar(len(reqs), "segment", progress) as bar:
            _report_done(plan, todo, on_result)
            bar.update(len(reqs) - len(todo))

            async def run_one(i: int) -> None:
                async with sem:
                    plan.results[i] = await self._run_item(plan, i)
                if on_result is not None:
                    on_result(i, plan.results[i])
                bar.update()

            await asyncio.gather(*(run_one(i) for i in todo))
        self.last_batch_stats = plan.stats(time.perf_counter() - t0)
        return [r for r in plan.results if r is not None]

    async def _run_item(self, plan: Plan, i: int) -> Result:
        failed = self._embed_failed(plan, i)
        if failed is not None:
            return failed
        first, resend = plan.payloads(i)
        try:
            try:
                return Segmentation.from_response(
                    await self._request("POST", "/v1/segment", first))
            except Exception as exc:
                if resend is None or not is_not_found(exc):
                    raise
            plan.resends += 1  # the embedding was evicted: send the image itself, once
            return Segmentation.from_response(await self._request("POST", "/v1/segment", resend))
        except Exception as exc:  # one failed item must not stop the others
            return BatchError(exc, index=i)

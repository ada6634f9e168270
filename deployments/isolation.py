"""Failure isolation: one bad item fails alone, and a replica that died is worth one more try.

Batched model calls. A `@serve.batch` method hands each caller the value in its slot; Serve 2.60
passes an exception *instance* through as a value (only an exception *raised* by the method
reaches every caller), so the batch methods return each failed item's exception in its slot and
the caller re-raises it (`unwrap`). `isolated` runs the batch and, if the batched call raises,
each item alone: only the culprit fails.

Replica death. When a replica dies (kill -9, OOM, a lost node), the requests in flight on it fail
with Ray's actor-death errors; Serve starts a new replica by itself. Those failures say nothing
about the request, so they are answered 503 + Retry-After (`as_api_error`) and the Ingress retries
them once (`lost_replica`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

log = logging.getLogger("biprompt.serve")

T = TypeVar("T")
R = TypeVar("R")

REPLICA_RETRY_S = 2.0  # Retry-After when a replica died: a new one takes seconds to start
# ActorDiedError and ActorUnavailableError are RayActorErrors; listed for the reader.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError,
)


def lost_replica(exc: BaseException) -> BaseException | None:
    """The actor-death error behind `exc` if it failed because a replica (or the whole
    deployment) was gone, not because of the request; else None. `exc` as a handle call raised
    it: Ray wraps it in RayTaskErrors (`.cause`), and Serve raises a RayServeException whose
    `__cause__` is the ActorDiedError when an upstream replica died (a DeploymentResponse passed
    along as an argument failed)."""
    for _ in range(16):
        if exc is None:
            return None
        if isinstance(exc, REPLICA_GONE):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def isolated(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T],
             role: str = "model") -> list[R | Exception]:
    """`fn(items)` (one output per item) as one batched call; if that raises, `fn([item])` for
    each item, so only the items that fail alone fail. A failed item's slot holds its exception.
    Synchronous: run it in the model thread (`run_model(isolated, fn, items)`)."""
    items = list(items)
    if not items:
        return []
    try:
        out = list(fn(items))
        if len(out) != len(items):
            raise RuntimeError(f"{role}: {len(out)} outputs for {len(items)} items")
        return out
    except Exception as exc:  # noqa: BLE001 - find the culprit below
        if len(items) == 1:
            return [exc]
        log.warning("%s: a batch of %d failed (%s: %s); running its items one by one", role,
                    len(items), type(exc).__name__, exc)
    results: list[R | Exception] = []
    for item in items:
        try:
            (one,) = fn([item])
            results.append(one)
        except Exception as exc:  # noqa: BLE001 - this item's own error, for its caller
            results.append(exc)
    return results


def unwrap(value: Any) -> Any:
    """A batch slot's value; raises the item's own error if it failed."""
    if isinstance(value, BaseException):
        raise value
    return value


def failures(values: Sequence[Any]) -> int:
    return sum(isinstance(v, BaseException) for v in values)


def log_retry(what: str, gone: BaseException) -> None:
    log.warning("%s: a replica went away mid-request (%s); retrying once", what,
                type(gone).__name__)

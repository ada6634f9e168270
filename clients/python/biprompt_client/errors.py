"""Client-side errors, mirroring the server's error types (biprompt.errors) by HTTP status.

Every error carries `status_code` (None when no response arrived), the server's `type` string
as sent (e.g. "invalid_image"), `message` and `request_id` (the X-Request-ID of the call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "BiPromptClientError",
    "InvalidInputError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServerError",
    "error_from_response",
]


class BiPromptClientError(Exception):
    """Base class of every error the client raises for a failed call."""

    default_type = "http_error"

    def __init__(self, message: str, *, status_code: int | None = None,
                 type: str | None = None, request_id: str | None = None):  # noqa: A002
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or self.default_type
        self.request_id = request_id

    def __str__(self) -> str:
        where = [f"status {self.status_code}"] if self.status_code is not None else []
        where.append(self.type)
        if self.request_id:
            where.append(f"request_id {self.request_id}")
        return f"{self.message} ({', '.join(where)})"

    def __reduce__(self) -> tuple[Any, ...]:  # keep the keyword attributes across pickling
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[BiPromptClientError], message: str,
             state: dict[str, Any]) -> BiPromptClientError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidInputError(BiPromptClientError, ValueError):
    """422: a request the caller can fix (types invalid_input, invalid_image, invalid_prompt)."""

    default_type = "invalid_input"


class PayloadTooLargeError(BiPromptClientError, ValueError):
    """413: the body (or the number of batch items) is over the server's limit."""

    default_type = "payload_too_large"


class NotFoundError(BiPromptClientError):
    """404: an unknown image_id (its embedding expired or was never computed)."""

    default_type = "not_found"


class AuthenticationError(BiPromptClientError):
    """401: a missing or wrong API key."""

    default_type = "unauthorized"


class OverloadedError(BiPromptClientError):
    """503 or 429: the server is busy; `retry_after` is its Retry-After in seconds, if sent."""

    default_type = "overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(BiPromptClientError):
    """Any other 5xx, or a response the client could not parse."""

    default_type = "internal_error"


class APIConnectionError(BiPromptClientError):
    """No response: the connection failed or broke (status_code is None)."""

    default_type = "connection_error"


class APITimeoutError(APIConnectionError):
    """No response within the client's timeout."""

    default_type = "timeout"


_BY_STATUS: dict[int, type[BiPromptClientError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
    429: OverloadedError,
    503: OverloadedError,
}


def error_from_response(status: int, body: Mapping[str, Any] | None,
                        request_id: str | None = None, *, retry_after: float | None = None,
                        text: str | None = None) -> BiPromptClientError:
    """The error for an HTTP error response. `body` is the decoded error body
    (`{"error": {"type", "message", "request_id"}}`, or just its inner object) or None when it
    could not be parsed; `text` is then used as the message. `request_id` (the X-Request-ID
    header) wins over the body's."""
    info: Mapping[str, Any] = {}
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        info = inner if isinstance(inner, Mapping) else {}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BiPromptClientError)
    message = info.get("message")
    if not isinstance(message, str) or not message:
        snippet = (text or "").strip()[:200]
        message = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    err_type = info.get("type") if isinstance(info.get("type"), str) else None
    rid = request_id or (info.get("request_id") if isinstance(info.get("request_id"), str)
                         else None)
    kwargs: dict[str, Any] = {"status_code": status, "type": err_type, "request_id": rid}
    if cls is OverloadedError:
        return OverloadedError(message, retry_after=retry_after, **kwargs)
    return cls(message, **kwargs)

"""The error vocabulary shared by the library, the deployments and (mirrored) the client.

Every error knows its HTTP status and a stable `type` string; the ingress maps any exception by
`getattr(exc, "status_code", 500)`. All are plain exceptions with a single message argument, so
they pickle across Ray actors.
"""

from __future__ import annotations


class BiPromptError(Exception):
    """Base class. `type` is the machine-readable name sent in error bodies."""

    status_code: int = 500
    type: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInputError(BiPromptError, ValueError):
    """A request the caller can fix: bad image, points, labels, text or mode."""

    status_code = 422
    type = "invalid_input"


class InvalidImageError(InvalidInputError):
    type = "invalid_image"


class InvalidPromptError(InvalidInputError):
    type = "invalid_prompt"


class PayloadTooLargeError(BiPromptError, ValueError):
    status_code = 413
    type = "payload_too_large"


class NotFoundError(BiPromptError, KeyError):
    """An unknown image_id (its embedding expired or was never computed)."""

    status_code = 404
    type = "not_found"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ModelConfigError(BiPromptError, ValueError):
    """Unknown variant, incompatible models, a bad profile."""

    status_code = 500
    type = "model_config_error"


class CheckpointError(ModelConfigError):
    """A checkpoint that doesn't fit the model: missing, unexpected or mis-shaped keys."""

    type = "checkpoint_error"


class WeightsUnavailableError(ModelConfigError):
    """Weights that can't be found locally and can't be downloaded (offline, no network)."""

    type = "weights_unavailable"


class UnauthorizedError(BiPromptError):
    """A missing or wrong API key (Authorization: Bearer <key>)."""

    status_code = 401
    type = "unauthorized"


class OverloadedError(BiPromptError):
    """Queues are full or a replica is unavailable: retry after `retry_after_s`."""

    status_code = 503
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keep retry_after_s across Ray's pickling
        return (type(self), (self.message, self.retry_after_s))


ERROR_TYPES: dict[str, type[BiPromptError]] = {
    cls.type: cls
    for cls in (
        BiPromptError, InvalidInputError, InvalidImageError, InvalidPromptError,
        PayloadTooLargeError, NotFoundError, ModelConfigError, CheckpointError,
        WeightsUnavailableError, UnauthorizedError, OverloadedError,
    )
}

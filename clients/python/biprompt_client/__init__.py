"""Light Python client for biprompt-serve (installs without torch, ray or pycocotools)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncBiPromptClient, BiPromptClient
    from .errors import (
        APIConnectionError,
        APITimeoutError,
        AuthenticationError,
        BiPromptClientError,
        InvalidInputError,
        NotFoundError,
        OverloadedError,
        PayloadTooLargeError,
        ServerError,
        error_from_response,
    )
    from .images import image_size, load_image_bytes
    from .results import BatchError, Candidate, Segmentation, decode_mask

__version__ = "0.1.0"

# Public name -> submodule. Loaded on first use, so that the server, which imports only
# biprompt_client.schema and biprompt_client.rle, does not pay for httpx and tqdm.
_EXPORTS = {
    "BiPromptClient": "client", "AsyncBiPromptClient": "client",
    "BiPromptClientError": "errors", "InvalidInputError": "errors",
    "PayloadTooLargeError": "errors", "NotFoundError": "errors",
    "AuthenticationError": "errors", "OverloadedError": "errors", "ServerError": "errors",
    "APIConnectionError": "errors", "APITimeoutError": "errors",
    "error_from_response": "errors",
    "load_image_bytes": "images", "image_size": "images",
    "Segmentation": "results", "Candidate": "results", "BatchError": "results",
    "decode_mask": "results",
}

__all__ = [
    "APIConnectionError", "APITimeoutError", "AsyncBiPromptClient", "AuthenticationError",
    "BatchError", "BiPromptClient", "BiPromptClientError", "Candidate", "InvalidInputError",
    "NotFoundError", "OverloadedError", "PayloadTooLargeError", "Segmentation", "ServerError",
    "decode_mask", "error_from_response", "image_size", "load_image_bytes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

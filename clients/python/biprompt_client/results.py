"""Result objects: a `Segmentation` per successful segment call, a `BatchError` per failed item.

Masks are decoded lazily (on first access) from COCO RLE, PNG bytes (msgpack) or base64 PNG
strings (JSON) into HxW bool arrays.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from . import rle

__all__ = ["BatchError", "Candidate", "Segmentation", "decode_mask"]


def decode_mask(value: Any) -> np.ndarray | None:
    """A wire mask (RLE dict, PNG bytes or base64 PNG string, or None) -> HxW bool array."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return rle.decode(value)
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("mask string is not base64 (expected a base64 PNG)") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as img:
            arr = np.asarray(img.convert("L"))
        return arr > 0
    raise ValueError(f"unsupported mask value of type {type(value).__name__}")


@dataclass(frozen=True)
class Candidate:
    """One of SAM's candidate masks with its scores; `mask` only if return_candidates was set."""

    index: int
    predicted_iou: float
    text_iou: float | None
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(eq=False)
class Segmentation:
    """A segment response. `raw` is the decoded response body; the rest are views of it."""

    ok: ClassVar[bool] = True

    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_response(cls, body: Mapping[str, Any]) -> Segmentation:
        missing = [k for k in ("image_id", "width", "height", "mask_format") if k not in body]
        if missing:
            raise ValueError(f"not a segment response: missing {missing}")
        return cls(dict(body))

    # --- masks ------------------------------------------------------------------------------

    @cached_property
    def mask(self) -> np.ndarray | None:
        """The selected mask, HxW bool (None when mask_format was "none")."""
        return decode_mask(self.raw.get("mask"))

    @property
    def rle(self) -> dict[str, Any] | None:
        m = self.raw.get("mask")
        return dict(m) if isinstance(m, Mapping) else None

    @cached_property
    def text_mask(self) -> np.ndarray | None:
        return decode_mask(self.raw.get("text_mask"))

    @cached_property
    def candidates(self) -> list[Candidate]:
        return [
            Candidate(index=int(c["index"]), predicted_iou=float(c["predicted_iou"]),
                      text_iou=None if c.get("text_iou") is None else float(c["text_iou"]),
                      mask=decode_mask(c.get("mask")))
            for c in self.raw.get("candidates") or []
        ]

    # --- fields -----------------------------------------------------------------------------

    @property
    def selected(self) -> int | None:
        return self.raw.get("selected")

    @property
    def strategy(self) -> str | None:
        return self.raw.get("strategy")

    @property
    def agreement(self) -> float | None:
        return self.raw.get("agreement")

    @property
    def mode(self) -> str | None:
        return self.raw.get("mode")

    @property
    def mask_format(self) -> str:
        return self.raw["mask_format"]

    @property
    def image_id(self) -> str:
        return self.raw["image_id"]

    @property
    def cache_hit(self) -> bool:
        """Whether the image embedding came from the server's cache."""
        return self.raw.get("cache") == "hit"

    @property
    def text_cache_hit(self) -> bool | None:
        """Whether the text mask came from the cache; None when no text mask was computed."""
        state = self.raw.get("text_cache")
        return None if state is None else state == "hit"

    @property
    def timings_ms(self) -> dict[str, float]:
        return dict(self.raw.get("timings_ms") or {})

    @property
    def request_id(self) -> str | None:
        return self.raw.get("request_id")

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.raw.get("model") or {})

    @property
    def width(self) -> int:
        return int(self.raw["width"])

    @property
    def height(self) -> int:
        return int(self.raw["height"])

    def __repr__(self) -> str:
        return (f"Segmentation(image_id={self.image_id[:12]}..., size={self.height}x{self.width}, "
                f"mode={self.mode}, selected={self.selected}, strategy={self.strategy}, "
                f"cache_hit={self.cache_hit}, request_id={self.request_id})")


@dataclass
class BatchError:
    """A failed item of a batch: `error` is the exception (usually a BiPromptClientError)."""

    ok: ClassVar[bool] = False

    error: BaseException
    index: int | None = None

    @property
    def status_code(self) -> int | None:
        return getattr(self.error, "status_code", None)

    @property
    def type(self) -> str:
        return getattr(self.error, "type", None) or type(self.error).__name__

    @property
    def message(self) -> str:
        return getattr(self.error, "message", None) or str(self.error)

    @property
    def request_id(self) -> str | None:
        return getattr(self.error, "request_id", None)

    def raise_(self) -> None:
        """Raise the underlying exception."""
        raise self.error

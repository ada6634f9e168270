"""Result objects: a `Segmentation` per successful segment call, a `BatchError` per failed item.

Masks are decoded lazily (on first access) from COCO RLE, polygons, PNG bytes (msgpack) or base64
PNG strings (JSON) into HxW bool arrays.
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
from PIL import Image, ImageDraw

from . import rle

__all__ = ["BatchError", "Candidate", "Segmentation", "decode_mask", "rasterize_polygons"]


def decode_mask(value: Any) -> np.ndarray | None:
    """A wire mask (RLE dict, polygons dict, PNG bytes or base64 PNG string, or None) -> HxW bool
    array."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return rasterize_polygons(value) if "polygons" in value else rle.decode(value)
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


def rasterize_polygons(value: Mapping[str, Any]) -> np.ndarray:
    """A polygon mask ({"size": [h, w], "polygons": [{"exterior", "holes"}, ...]}) -> HxW bool.

    Vertices are pixel centres; a pixel is set when its centre lies inside or on a region's
    exterior and neither inside nor on one of that region's holes (`schema.Polygons`). Each
    region is drawn on its own, so islands inside holes need no particular order."""
    try:
        h, w = (int(d) for d in value["size"])
        regions = list(value["polygons"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("polygon mask must have 'size' [h, w] and a 'polygons' list") from None
    if h < 0 or w < 0:
        raise ValueError(f"polygon mask 'size' must be non-negative, got {[h, w]}")
    out = np.zeros((h, w), dtype=bool)
    for region in regions:
        try:
            exterior = _ring(region["exterior"])
            holes = [_ring(r) for r in region.get("holes") or []]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError("each polygon needs an 'exterior' [[x, y], ...] and optional "
                             "'holes' [[[x, y], ...], ...]") from None
        if not exterior:
            continue
        x0 = max(0, int(np.floor(min(x for x, _ in exterior))))
        y0 = max(0, int(np.floor(min(y for _, y in exterior))))
        x1 = min(w, int(np.ceil(max(x for x, _ in exterior))) + 1)
        y1 = min(h, int(np.ceil(max(y for _, y in exterior))) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        canvas = Image.new("L", (x1 - x0, y1 - y0))
        draw = ImageDraw.Draw(canvas)
        _draw_ring(draw, exterior, x0, y0, 1)
        for hole in holes:
            _draw_ring(draw, hole, x0, y0, 0)
        out[y0:y1, x0:x1] |= np.asarray(canvas) > 0
    return out


def _ring(points: Any) -> list[tuple[float, float]]:
    ring = [(float(x), float(y)) for x, y in points]
    if not all(np.isfinite(v) for p in ring for v in p):
        raise ValueError("polygon vertices must be finite")
    return ring


def _draw_ring(draw: ImageDraw.ImageDraw, ring: list[tuple[float, float]], x0: int, y0: int,
               value: int) -> None:
    """Fill the ring and its outline (inside or on counts), shifted into the region's crop."""
    xy = [(x - x0, y - y0) for x, y in ring]
    if len(xy) >= 3:
        draw.polygon(xy, fill=value, outline=value)
    elif xy:  # fewer than 3 vertices (not written by the server): a pixel or a run of pixels
        draw.line(xy + xy[:1], fill=value)


@dataclass(frozen=True)
class Candidate:
    """One of SAM's candidate masks with its scores; `mask` only if return_candidates was set."""

    index: int
    predicted_iou: float
    text_iou: float | None
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    expert_ious: dict[str, float] = field(default_factory=dict)  # IoU with each expert's mask


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
    def logits_id(self) -> str | None:
        """With logits="id": the next click's `mask_input_id`."""
        return self.raw.get("logits_id")

    @cached_property
    def logits(self) -> np.ndarray | None:
        """With logits="raw": the mask's LxL low-res logits (float32), the next click's
        `mask_input`."""
        raw, side = self.raw.get("logits"), self.raw.get("logits_size")
        if raw is None or side is None:
            return None
        if isinstance(raw, str):
            raw = base64.b64decode(raw)
        return np.frombuffer(raw, dtype="<f2").reshape(int(side), int(side)).astype(np.float32)

    @property
    def rle(self) -> dict[str, Any] | None:
        m = self.raw.get("mask")
        return dict(m) if isinstance(m, Mapping) and "counts" in m else None

    @cached_property
    def text_mask(self) -> np.ndarray | None:
        return decode_mask(self.raw.get("text_mask"))

    @cached_property
    def reference_mask(self) -> np.ndarray | None:
        """The reference expert's mask (with return_expert_masks)."""
        return decode_mask(self.raw.get("reference_mask"))

    @property
    def expert_agreement(self) -> float | None:
        """The lowest IoU between two experts' masks (None with fewer than two): low means the
        experts saw different objects, a case for a human."""
        return self.raw.get("expert_agreement")

    @cached_property
    def candidates(self) -> list[Candidate]:
        return [
            Candidate(index=int(c["index"]), predicted_iou=float(c["predicted_iou"]),
                      text_iou=None if c.get("text_iou") is None else float(c["text_iou"]),
                      mask=decode_mask(c.get("mask")),
                      expert_ious={k: float(v) for k, v in (c.get("expert_ious") or {}).items()})
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

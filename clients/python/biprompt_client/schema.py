"""The v1 wire schema, shared by the server (FastAPI validates and documents with it) and the
client. One definition: the server imports these models, it does not redefine them.

Bodies travel as JSON (`application/json`; image and PNG bytes as base64 strings) or msgpack
(`application/msgpack`; raw bytes, no base64). `encode_body` / `decode_body` do both.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, model_validator

API_VERSION = "v1"
JSON = "application/json"
MSGPACK = "application/msgpack"
MEDIA_TYPES = (JSON, MSGPACK)

MAX_TEXT_CHARS = 2048  # a hard wire limit; the text model's own (token) limit is checked later
MAX_WIRE_POINTS = 64
# Arrays and objects inside one another, counting the body itself. The deepest valid body (a
# batch's item's points) has 5 levels; past this, a body is refused before it is looked at.
MAX_NESTING_DEPTH = 32

Mode = Literal["biprompt", "point", "text", "reference"]
LogitsReturn = Literal["none", "id", "raw"]
LogitsId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="a server-side handle "
                                "for an answer's low-res logits")]
MAX_LOGITS_BYTES = 256 * 256 * 2  # SAM's 256x256 low-res logits in float16
MaskFormat = Literal["rle", "polygon", "png", "none"]
CacheState = Literal["hit", "miss"]
ImageId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the image bytes")]
Point = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# "exactly one of image and image_id" for the schema's readers (null counts as absent, as in
# `SegmentRequest._one_image`)
_ONE_IMAGE = {"oneOf": [
    {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
    for name in ("image", "image_id")
], "not": {"required": ["mask_input", "mask_input_id"], "properties": {  # at most one of them
    name: {"not": {"type": "null"}} for name in ("mask_input", "mask_input_id")}}}


class RLE(BaseModel):
    """COCO compressed RLE, as pycocotools writes it (counts decoded to str)."""

    size: tuple[int, int]
    counts: str


def _present(name: str) -> dict:
    """JSON Schema: `name` is there and not null (null counts as absent, as in the models)."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


class ReferenceSpec(_Strict):
    """An annotated reference image: "segment things like this one". The reference expert finds
    objects like the annotated one in the request's image, and votes on SAM's candidates. Give
    `image` or `image_id`, and the object as a `mask` or as `points` (and `point_labels`) and/or
    a `box`, which SAM turns into the mask. Its features are cached per (image, annotation): a
    reference used for a thousand target images is encoded once."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"oneOf": [_present(name) for name in ("image", "image_id")]},
        {"oneOf": [_present("mask"), {"anyOf": [
            {"required": ["points"], "properties": {"points": {"minItems": 1}}},
            _present("box")]}]},
    ]})

    image: bytes | None = Field(None, description="the reference image, encoded; base64 in JSON")
    image_id: ImageId | None = None
    mask: RLE | None = Field(None, description="the reference object, COCO RLE at the reference "
                             "image's size (column-major, as pycocotools writes it)")
    points: list[Point] = Field(default_factory=list, max_length=MAX_WIRE_POINTS,
                                description="[[x, y], ...] on the reference object, in the "
                                "reference image's pixels")
    point_labels: list[int] | None = Field(None, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1] "
                                                          "around the reference object")

    @model_validator(mode="after")
    def _one_image_one_annotation(self) -> ReferenceSpec:
        if (self.image is None) == (self.image_id is None):
            raise ValueError("reference: give exactly one of `image` and `image_id`")
        if (self.mask is None) == (not self.points and self.box is None):
            raise ValueError("reference: give the object as a `mask`, or as `points` and/or a "
                             "`box`")
        return self


class SegmentRequest(_Strict):
    """One object on one image. Give `image` (the encoded file: PNG, JPEG, ...) or the `image_id`
    an earlier call returned."""

    model_config = ConfigDict(json_schema_extra=_ONE_IMAGE)

    image: bytes | None = Field(None, description="encoded image; base64 in JSON, raw in msgpack")
    image_id: ImageId | None = None
    points: list[Point] = Field(default_factory=list, max_length=MAX_WIRE_POINTS,
                                description="[[x, y], ...] in original-image pixels")
    point_labels: list[int] | None = Field(None, description="1 foreground, 0 background; "
                                           "default: all 1")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="referring expression")
    reference: ReferenceSpec | None = Field(None, description="an annotated reference image: a "
                                            "third expert that votes (mode 'reference': its "
                                            "mask is the answer)")
    mode: Mode = "biprompt"
    mask_format: MaskFormat = "rle"
    return_candidates: bool = Field(False, description="include the three candidate masks")
    return_text_mask: bool = Field(False, description="include the text model's mask")
    return_expert_masks: bool = Field(False, description="include every expert's mask "
                                      "(`text_mask`, `reference_mask`)")
    # refinement clicks: the previous answer's low-res logits as SAM's mask_input
    mask_input_id: LogitsId | None = Field(None, description="the `logits_id` of an earlier "
                                           "answer on this image: its mask's low-res logits, "
                                           "kept on the server for an hour")
    mask_input: bytes | None = Field(None, max_length=MAX_LOGITS_BYTES, description="the "
                                     "previous mask's low-res logits themselves: LxL float16, "
                                     "little-endian, row-major (L = 256 for SAM; the reply's "
                                     "`logits_size`); base64 in JSON, raw in msgpack")
    logits: LogitsReturn = Field("none", description="the answer's low-res logits, for the next "
                                 "click: 'id' keeps them on the server and returns `logits_id` "
                                 "(a few bytes); 'raw' returns them in `logits`; 'none'")
    multimask: bool | None = Field(None, description="SAM's three candidates (true) or its "
                                   "single mask (false); default: three on a first click, and "
                                   "on refinement what the mode's policy says (README)")

    @model_validator(mode="after")
    def _one_image(self) -> SegmentRequest:
        if (self.image is None) == (self.image_id is None):
            raise ValueError("give exactly one of `image` and `image_id`")
        if self.mask_input is not None and self.mask_input_id is not None:
            raise ValueError("give at most one of `mask_input` and `mask_input_id`")
        return self


class EmbedRequest(_Strict):
    image: bytes = Field(description="encoded image; base64 in JSON, raw in msgpack")


class BatchRequest(_Strict):
    items: list[SegmentRequest] = Field(min_length=1, description="an invalid item gets its own "
                                        "error in the results; the others are answered")


class BatchEnvelope(_Strict):
    """What the server checks of a batch body as a whole; it validates each item on its own."""

    items: list[Any] = Field(min_length=1)


class PolygonRegion(BaseModel):
    """One 8-connected region of a polygon mask."""

    exterior: list[Point] = Field(min_length=3, description="[[x, y], ...] pixel centres of the "
                                  "region's outermost pixels, in order; not repeated at the end")
    holes: list[Annotated[list[Point], Field(min_length=3)]] = Field(
        default_factory=list, description="each [[x, y], ...] through the outermost pixels of a "
        "hole (the background it cuts out)")


class Polygons(BaseModel):
    """A mask as simplified polygons with holes (mask_format "polygon"). Vertices are pixel
    centres in image pixels (x right, y down: vertex (x, y) is the centre of column x, row y). A
    pixel is in the mask when its centre lies inside or on some region's exterior and neither
    inside nor on one of that region's holes; an island inside a hole is a region of its own.
    Regions with fewer than 3 vertices (a lone pixel, a straight one-pixel-wide run) are left
    out; the RLE format is lossless."""

    size: tuple[int, int] = Field(description="[h, w], as in RLE")
    polygons: list[PolygonRegion] = Field(description="one per region, largest first")
    tolerance: float = Field(description="Douglas-Peucker tolerance in pixels: every traced "
                             "boundary pixel centre lies within this of its simplified ring")


Mask = RLE | Polygons | bytes  # rle -> RLE; polygon -> Polygons; png -> PNG bytes (base64 in JSON)


class Candidate(BaseModel):
    index: int
    predicted_iou: float
    text_iou: float | None = None
    expert_ious: dict[str, float] = Field(default_factory=dict, description="IoU of this "
                                          "candidate with each expert's mask, by expert")
    mask: Mask | None = None


class ModelIds(BaseModel):
    sam: str
    text: str | None = None
    reference: str | None = None


class SegmentResponse(BaseModel):
    request_id: str
    image_id: str
    width: int
    height: int
    mode: Mode
    mask_format: MaskFormat
    mask: Mask | None = None
    selected: int | None = None
    strategy: str
    agreement: float | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    text_mask: Mask | None = None
    reference_mask: Mask | None = None
    expert_agreement: float | None = Field(None, description="the lowest IoU between two "
                                           "experts' masks (null with fewer than two): low "
                                           "means they saw different objects; ask a human")
    cache: CacheState = Field(description="the image embedding: hit or miss")
    text_cache: CacheState | None = Field(None, description="the text mask: hit, miss or none")
    reference_cache: CacheState | None = Field(None, description="the reference expert's mask "
                                               "on this image: hit, miss or none")
    logits_id: LogitsId | None = Field(None, description="with logits='id': name it as the next "
                                       "click's `mask_input_id`")
    logits: bytes | None = Field(None, description="with logits='raw': LxL float16 low-res "
                                 "logits of the mask (base64 in JSON)")
    logits_size: int | None = Field(None, description="L of those logits")
    timings_ms: dict[str, float] = Field(default_factory=dict)
    bytes_moved: dict[str, int] = Field(
        default_factory=dict, description="payload bytes this request moved between the "
        "server's replicas, by hop (encoder, points, text, selector) and in total")
    model: ModelIds


class EmbedResponse(BaseModel):
    request_id: str
    image_id: str
    width: int
    height: int
    cache: CacheState
    timings_ms: dict[str, float] = Field(default_factory=dict)
    model: ModelIds


class ErrorInfo(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class BatchItem(BaseModel):
    status: int = Field(description="the HTTP status this item would have had on its own")
    result: SegmentResponse | None = None
    error: ErrorInfo | None = None


class BatchResponse(BaseModel):
    request_id: str
    results: list[BatchItem]


class ModelInfo(BaseModel):
    model: ModelIds
    sam_variant: str
    image_size: int
    text_model: bool
    reference_model: bool = False
    limits: dict[str, Any]
    cache: str


# --- bodies ---------------------------------------------------------------------------------


class WireError(ValueError):
    """A body that can't be parsed as the declared media type."""


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type / Accept value to JSON or MSGPACK (JSON when absent)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        return MSGPACK
    return JSON


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def encode_body(obj: Any, media: str = JSON) -> bytes:
    """A dict (or pydantic model) -> JSON (bytes as base64) or msgpack (bytes raw)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="python", exclude_none=False)
    if media == MSGPACK:
        return msgpack.packb(obj, use_bin_type=True)
    return json.dumps(_jsonable(obj), separators=(",", ":")).encode("utf-8")


_BYTES_FIELDS = ("image",)


def decode_body(data: bytes, media: str = JSON) -> Any:
    """Parse a request body. JSON: the `image` fields are base64 strings and come back as bytes.
    Bodies nested deeper than MAX_NESTING_DEPTH are a WireError."""
    if media == MSGPACK:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except msgpack.StackError:
            raise _too_deep() from None
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
            raise WireError(f"body is not valid msgpack: {_plain(exc)}") from None
        _check_depth(obj)
        return obj
    try:
        obj = json.loads(data)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"body is not valid JSON: {_plain(exc)}") from None
    _check_depth(obj)
    return _unbase64(obj)


def _too_deep() -> WireError:
    return WireError(f"body is nested too deeply: at most {MAX_NESTING_DEPTH} levels of arrays "
                     "and objects")


def _plain(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _check_depth(obj: Any) -> None:
    """Iterative (no recursion of its own): a WireError past MAX_NESTING_DEPTH."""
    level = [obj]
    for _ in range(MAX_NESTING_DEPTH):
        level = [v for c in level if isinstance(c, (dict, list, tuple))
                 for v in (c.values() if isinstance(c, dict) else c)]
        if not level:
            return
    if any(isinstance(c, (dict, list, tuple)) for c in level):
        raise _too_deep()


def _unbase64(obj: Any, path: str = "") -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _BYTES_FIELDS and isinstance(v, str):
                try:
                    out[k] = base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise WireError(f"{path}{k}: not valid base64") from None
            else:
                out[k] = _unbase64(v, f"{path}{k}.")
        return out
    if isinstance(obj, list):
        return [_unbase64(v, f"{path}{i}.") for i, v in enumerate(obj)]
    return obj

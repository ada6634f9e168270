"""A Label Studio ML backend on the Ingress: Label Studio's /predict, /setup, /webhook and
/health (label-studio-ml-backend's label_studio_ml/api.py) over our segment path.

One interactive click in Label Studio:
    the project's label config -> which BrushLabels control writes to which Image, and the task
    data key holding its URL -> the image fetched (Label Studio paths with its API token) ->
    the context's smart keypoints / rectangle / text area, percent -> pixels -> one of our
    segment requests -> our COCO RLE mask -> a brushlabels region in Label Studio's brush RLE.

No Ray and no web framework here: the Ingress hands in `segment` (its segment_one), `info` and
the routes' bodies, so the tests run it with fakes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from biprompt_client import rle
from biprompt_client.schema import SegmentRequest
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from biprompt.errors import (
    BiPromptError,
    InvalidImageError,
    InvalidInputError,
    PayloadTooLargeError,
    UnauthorizedError,
)

MODEL_CLASS = "BiPromptSAM"
# the events label_studio_ml/api.py hands to a model's fit(); we acknowledge them and train nothing
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                "START_TRAINING")
KEYPOINT_TYPES = ("keypointlabels", "keypoint")
RECTANGLE_TYPES = ("rectanglelabels", "rectangle")
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
FETCH_TIMEOUT_S = 30.0

Segment = Callable[[SegmentRequest, str], Awaitable[dict]]
FetchImage = Callable[[str, Any], Awaitable[bytes]]


class UpstreamError(BiPromptError):
    """The image server (Label Studio or the task's URL) failed us: unreachable, timed out, or
    answered an error."""

    status_code = 502
    type = "upstream_error"


class BasicAuthError(UnauthorizedError):
    """401 on the Label Studio routes; the challenge names Basic, which Label Studio sends."""

    challenge = 'Basic realm="label-studio"'


# --- the label config -----------------------------------------------------------------------

@dataclass(frozen=True)
class Controls:
    """Where our mask goes: the BrushLabels control (from_name), the Image it labels (to_name),
    the task data key of the image's URL (`value="$image"` -> "image") and the brush labels."""

    brush: str
    image: str
    data_key: str
    labels: tuple[str, ...]


def parse_label_config(config: str | None, to_name: str | None = None) -> Controls:
    """The BrushLabels control (the one labelling `to_name`, when given and present) and its
    Image. Tag names match case-insensitively, as Label Studio's do."""
    if not config or not config.strip():
        raise InvalidInputError("no label config: the request must carry the project's "
                                "label_config")
    if "<!DOCTYPE" in config.upper() or "<!ENTITY" in config.upper():
        raise InvalidInputError("label config: DTDs and entities are not accepted")
    try:
        root = ET.fromstring(config)
    except ET.ParseError as exc:
        raise InvalidInputError(f"label config is not valid XML: {exc}") from None
    images = {el.get("name"): el for el in root.iter() if el.tag.lower() == "image"}
    brushes = [el for el in root.iter() if el.tag.lower() == "brushlabels"]

    def target(el: ET.Element) -> str | None:
        names = [n.strip() for n in (el.get("toName") or "").split(",")]
        return next((n for n in names if n in images), None)

    candidates = [el for el in brushes if target(el) is not None]
    if not candidates:
        raise InvalidInputError("label config has no <BrushLabels toName=...> on an <Image>: "
                                "this backend answers with brush masks")
    brush = next((el for el in candidates if target(el) == to_name), candidates[0])
    image = target(brush)
    value = images[image].get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidInputError(f'<Image name="{image}"> needs value="$<data key>", got '
                                f"{value!r}")
    labels = tuple(lab.get("value") for lab in brush if lab.tag.lower() == "label"
                   and lab.get("value"))
    if not labels:
        raise InvalidInputError(f'<BrushLabels name="{brush.get("name")}"> has no <Label>')
    return Controls(brush.get("name") or "", image, value[1:], labels)


# --- the interactive context ----------------------------------------------------------------

class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Task(_Loose):
    id: int | str | None = None
    data: dict[str, Any]


class Region(_Loose):
    """One item of the context's `result`: a region the annotator drew with a smart tool."""

    type: str
    value: dict[str, Any] = {}
    from_name: str | None = None
    to_name: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    is_positive: bool | None = None


class PredictBody(_Loose):
    tasks: list[Task] = []
    label_config: str | None = None
    project: str | int | None = None
    params: dict[str, Any] = {}
    context: dict[str, Any] | None = None  # older Label Studio versions sent it here

    def regions(self) -> list[Region]:
        context = self.params.get("context") or self.context or {}
        if not isinstance(context, Mapping):
            raise InvalidInputError("params.context must be an object")
        return _validated(list[Region], context.get("result") or [], "context.result")


@dataclass(frozen=True)
class Interaction:
    """The context as one of our prompts: XY points and XYXY box in the image's pixels."""

    points: list[tuple[float, float]]
    point_labels: list[int]
    box: tuple[float, float, float, float] | None
    text: str | None
    label: str | None  # the label the annotator picked on a keypoint / rectangle, if any

    @property
    def mode(self) -> str | None:
        """keypoints/box and text: biprompt; keypoints/box: point; text: text; nothing: None."""
        geometry = bool(self.points) or self.box is not None
        if geometry:
            return "biprompt" if self.text else "point"
        return "text" if self.text else None


def _number(value: Mapping, key: str, kind: str) -> float:
    v = value.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidInputError(f"a {kind} region's value.{key} must be a number (percent of "
                                f"the image), got {v!r}")
    return float(v)


def _inside(v: float, side: int) -> float:
    """A point coordinate clamped into [0, side): the pixel grid is half-open."""
    return min(max(v, 0.0), math.nextafter(float(side), 0.0))


def _rectangle(value: Mapping, h: int, w: int) -> tuple[float, float, float, float]:
    """A Label Studio rectangle (percent x, y, width, height; `rotation` degrees clockwise
    about its top-left corner) -> its axis-aligned XYXY box in pixels, clamped into the image."""
    x, y = _number(value, "x", "rectangle") / 100 * w, _number(value, "y", "rectangle") / 100 * h
    bw = _number(value, "width", "rectangle") / 100 * w
    bh = _number(value, "height", "rectangle") / 100 * h
    theta = math.radians(float(value.get("rotation") or 0.0))
    c, s = math.cos(theta), math.sin(theta)
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return (min(max(min(xs), 0.0), w), min(max(min(ys), 0.0), h),
            min(max(max(xs), 0.0), w), min(max(max(ys), 0.0), h))


def read_context(regions: list[Region], size: tuple[int, int]) -> Interaction:
    """Keypoints -> points (label 1, or 0 where `is_positive` is false: Alt-click), the last
    rectangle -> the box, the first text of a text area -> text; percent of `size` = (h, w)."""
    h, w = size
    points, labels, box, text, label = [], [], None, None, None
    for region in regions:
        kind, value = region.type.lower(), region.value
        if kind in KEYPOINT_TYPES:
            points.append((_inside(_number(value, "x", "keypoint") / 100 * w, w),
                           _inside(_number(value, "y", "keypoint") / 100 * h, h)))
            labels.append(0 if region.is_positive is False else 1)
        elif kind in RECTANGLE_TYPES:
            box = _rectangle(value, h, w)
        elif kind == "textarea":
            texts = value.get("text") or []
            first = texts[0] if isinstance(texts, list) and texts else texts
            if isinstance(first, str) and first.strip():
                text = first.strip()
            continue
        else:
            continue
        picked = value.get(kind)
        if isinstance(picked, list) and picked and isinstance(picked[0], str):
            label = picked[0]
    return Interaction(points, labels, box, text, label)


# --- the output -----------------------------------------------------------------------------

def brush_rle(mask: np.ndarray) -> list[int]:
    """An HxW mask -> Label Studio's brush RLE (RGBA, 255 where the mask is), as the SDK's
    converter writes it."""
    # NOTE: imported on first use: the SDK's converter package takes ~1 s to import, which
    # Ingress replicas that never see Label Studio need not pay.
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def _score(out: Mapping) -> float | None:
    """SAM's predicted IoU of the selected candidate; else (text only) the agreement, if any."""
    selected = out.get("selected")
    for cand in out.get("candidates") or []:
        if cand.get("index") == selected:
            return float(cand["predicted_iou"])
    agreement = out.get("agreement")
    return None if agreement is None else float(agreement)


# --- images ---------------------------------------------------------------------------------

def _shown(url: str) -> str:
    """A URL fit for an error message: no query string (presigned URLs carry signatures)."""
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    return url.split("?", 1)[0][:200]


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class ImageFetcher:
    """Fetches a task's image. Absolute http(s) URLs as they are; Label Studio's own paths
    (/data/upload/..., /data/local-files/?d=..., upload/...) and cloud URIs (s3://, gs://,
    azure-blob://, via /tasks/<id>/presign/) joined to `base_url` (LABEL_STUDIO_URL). The token
    (LABEL_STUDIO_API_KEY) goes only to `base_url`'s origin, as `Authorization: Token <key>`."""

    def __init__(self, base_url: str | None, token: str | None, *, max_bytes: int,
                 timeout_s: float = FETCH_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None):
        if base_url and _origin(base_url)[0] not in ("http", "https"):
            raise ValueError(f"LABEL_STUDIO_URL must start with http:// or https://, got "
                             f"{base_url!r}")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.token = token or None
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)
        self.transport = transport

    def resolve(self, url: str, task_id: Any = None) -> tuple[str, dict[str, str]]:
        """-> (absolute URL, headers)."""
        url = url.strip()
        if url.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise InvalidInputError(f"cloud storage URL {_shown(url)}: the task needs its id")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            url = f"/tasks/{task_id}/presign/?fileuri={fileuri}"
        elif url.startswith(("upload/", "/upload/")):
            url = "/data/" + url.lstrip("/")
        scheme, netloc = _origin(url)
        if scheme in ("http", "https") and netloc:
            target = url
        elif not scheme and not netloc and url.startswith("/"):
            if self.base_url is None:
                raise InvalidInputError(f"{_shown(url)} is a Label Studio path: set "
                                        "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) on the server")
            target = self.base_url + url
        else:
            raise InvalidInputError(f"unsupported image URL {_shown(url)!r}: give an http(s) URL "
                                    "or a Label Studio path")
        headers = {}
        if self.token and self.base_url and _origin(target) == _origin(self.base_url):
            headers["Authorization"] = f"Token {self.token}"
        return target, headers

    async def __call__(self, url: str, task_id: Any = None) -> bytes:
        target, headers = self.resolve(url, task_id)
        try:
            return await asyncio.wait_for(self._get(target, headers), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise UpstreamError(f"fetching the image {_shown(target)} timed out after "
                                f"{self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"could not fetch the image {_shown(target)}: "
                                f"{type(exc).__name__}: {exc}") from None

    async def _get(self, target: str, headers: dict[str, str]) -> bytes:
        # follow_redirects: Label Studio's presign answers a redirect; httpx drops the
        # Authorization header when a redirect leaves the origin
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=True,
                                     timeout=self.timeout_s) as client:
            async with client.stream("GET", target, headers=headers) as r:
                if r.status_code >= 400:
                    hint = (" (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403)
                            and "Authorization" in headers else "")
                    raise UpstreamError(f"the image {_shown(target)} answered HTTP "
                                        f"{r.status_code}{hint}")
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise PayloadTooLargeError(f"the image {_shown(target)} is {declared} bytes; "
                                               f"the limit is {self.max_bytes}")
                chunks, size = [], 0
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLargeError(f"the image {_shown(target)} exceeds the "
                                                   f"limit of {self.max_bytes} bytes")
                    chunks.append(chunk)
        if not chunks:
            raise InvalidImageError(f"the image {_shown(target)} is empty (0 bytes)")
        return b"".join(chunks)


def displayed_size(data: bytes, where: str = "the image") -> tuple[int, int]:
    """(h, w) as displayed (EXIF orientation applied), from the header."""
    from biprompt_client.images import image_size

    try:
        return image_size(data)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"{where}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImageError(f"{where} is not an image this server can read") from None


# --- the protocol ---------------------------------------------------------------------------

def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise InvalidInputError("body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"body is not valid JSON: {exc}") from None


def _validated(model, obj: Any, what: str):
    try:
        return TypeAdapter(model).validate_python(obj)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, (what, *e['loc'])))}: {e['msg']}"
                         for e in exc.errors()[:5])
        raise InvalidInputError(errs) from None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class LabelStudioBackend:
    """Label Studio's ML backend protocol over our segment path.

    segment: (SegmentRequest, request id) -> our segment response dict (the Ingress's
    segment_one); info: () -> the served models' info ({"model": {"sam", "text"}, ...});
    fetch_image: (URL, task id) -> image bytes; basic_auth: (user, password) Label Studio
    sends; api_key: the app's key, accepted as Bearer on these routes too."""

    def __init__(self, segment: Segment, info: Callable[[], Awaitable[dict]],
                 fetch_image: FetchImage, *, basic_auth: tuple[str, str] | None = None,
                 api_key: str | None = None):
        self.segment, self.info, self.fetch_image = segment, info, fetch_image
        self.basic_auth = basic_auth
        self.api_key = api_key or None

    @classmethod
    def from_env(cls, segment: Segment, info: Callable[[], Awaitable[dict]], *,
                 max_image_bytes: int, api_key: str | None = None,
                 env: Mapping[str, str] = os.environ) -> LabelStudioBackend:
        """Label Studio's own variables, as label-studio-ml-backend reads them: LABEL_STUDIO_URL
        (or LABEL_STUDIO_HOST), LABEL_STUDIO_API_KEY (or LABEL_STUDIO_ACCESS_TOKEN),
        BASIC_AUTH_USER and BASIC_AUTH_PASS."""
        fetch = ImageFetcher(env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST"),
                             env.get("LABEL_STUDIO_API_KEY") or env.get("LABEL_STUDIO_ACCESS_TOKEN"),
                             max_bytes=max_image_bytes)
        user, password = env.get("BASIC_AUTH_USER"), env.get("BASIC_AUTH_PASS")
        return cls(segment, info, fetch, api_key=api_key,
                   basic_auth=(user, password) if user and password else None)

    def authorize(self, authorization: str | None) -> None:
        """Open when neither Basic auth nor an API key is configured; else either configured
        credential passes: Basic user/password (what Label Studio sends) or Bearer <api key>."""
        if self.basic_auth is None and self.api_key is None:
            return
        scheme, _, cred = (authorization or "").partition(" ")
        scheme, cred = scheme.lower(), cred.strip()
        if scheme == "basic" and self.basic_auth is not None:
            try:
                user, sep, password = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, ValueError):
                sep = ""
            if sep and _same(user, self.basic_auth[0]) & _same(password, self.basic_auth[1]):
                return
        elif scheme == "bearer" and self.api_key is not None and _same(cred, self.api_key):
            return
        ways = []
        if self.basic_auth is not None:
            ways.append("HTTP Basic auth (the server's BASIC_AUTH_USER / BASIC_AUTH_PASS)")
        if self.api_key is not None:
            ways.append("'Authorization: Bearer <api key>'")
        error = BasicAuthError if self.basic_auth is not None else UnauthorizedError
        raise error(f"missing or wrong credentials: the Label Studio routes take {' or '.join(ways)}")

    async def model_version(self) -> str:
        model = (await self.info())["model"]
        return "BiPrompt-SAM:" + model["sam"] + (f"+{model['text']}" if model.get("text") else "")

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS}

    async def setup(self, body: Any) -> dict:
        """Label Studio connects a project: {"project", "schema" (its label config), ...}. A
        config we cannot answer (no BrushLabels on an Image) is refused here, with the reason."""
        body = _validated(dict[str, Any], body, "body")
        if body.get("schema"):
            parse_label_config(body["schema"])
        return {"model_version": await self.model_version()}

    def webhook(self, body: Any) -> dict:
        action = body.get("action") if isinstance(body, Mapping) else None
        if action not in TRAIN_EVENTS:
            return {"status": "Unknown event"}
        return {"status": "ok", "result": {
            "trained": False, "event": action,
            "message": "biprompt-serve does not train: annotations do not change its models"}}

    async def predict(self, body: Any, request_id: str) -> dict:
        """{"tasks", "label_config", "params": {"context": {"result": [...]}}} -> {"results":
        [one prediction]} for the first task (the interactive one); no context: no results."""
        req = _validated(PredictBody, body, "body")
        regions = req.regions()
        if not req.tasks or not regions:
            return {"results": []}
        task = req.tasks[0]
        to_name = next((r.to_name for r in regions if r.to_name), None)
        controls = parse_label_config(req.label_config, to_name)
        url = task.data.get(controls.data_key)
        if not isinstance(url, str) or not url.strip():
            raise InvalidInputError(f"task {task.id}: data.{controls.data_key} (the image URL of "
                                    f'<Image name="{controls.image}">) is missing')
        image = await self.fetch_image(url, task.id)
        size = await asyncio.to_thread(displayed_size, image, f"the image of task {task.id}")
        prompt = read_context(regions, size)
        if prompt.mode is None:  # nothing we prompt with (e.g. only brush strokes)
            return {"results": []}
        seg = _validated(SegmentRequest, {
            "image": image, "points": prompt.points, "point_labels": prompt.point_labels or None,
            "box": prompt.box, "text": prompt.text, "mode": prompt.mode, "mask_format": "rle"},
            "prompt")
        out = await self.segment(seg, request_id)
        mask = rle.decode(out["mask"])
        version, score = await self.model_version(), _score(out)
        label = prompt.label if prompt.label in controls.labels else controls.labels[0]
        result = []
        if mask.any():
            result.append({
                "id": uuid.uuid4().hex[:10], "type": "brushlabels",
                "from_name": controls.brush, "to_name": controls.image,
                "original_width": int(out["width"]), "original_height": int(out["height"]),
                "image_rotation": 0,
                "value": {"format": "rle", "rle": await asyncio.to_thread(brush_rle, mask),
                          "brushlabels": [label]},
                "score": score, "readonly": False})
        return {"results": [{"result": result, "model_version": version, "score": score}]}

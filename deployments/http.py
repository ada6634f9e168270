"""The HTTP surface the Ingress sits behind: the FastAPI app, request ids, the error vocabulary
mapped to status codes and bodies ({"error": {"type", "message", "request_id"}}), and the body
media types (JSON or msgpack)."""

import logging
import re
import uuid

from biprompt_client.schema import JSON, MSGPACK, ErrorBody, WireError, encode_body, media_type
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from pydantic.json_schema import GenerateJsonSchema
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from biprompt.errors import BiPromptError, InvalidInputError, OverloadedError, UnauthorizedError
from deployments.isolation import REPLICA_RETRY_S, lost_replica

log = logging.getLogger("biprompt.serve")
# The API description is public: /docs and /openapi.json stay open when an API key is set (they
# describe the routes, they serve no data; README "Serving").
PUBLIC_PATHS = {"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}

# --- the OpenAPI document -------------------------------------------------------------------
# Request bodies are documented per media type: bytes are base64 strings in JSON and raw in
# msgpack. The models nested in a body (a batch's SegmentRequest) go into components, under the
# same name for JSON and with `Msgpack` appended for msgpack.


# what base64.b64decode(validate=True) takes: padded groups of four from the standard alphabet
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class _Base64Bytes(GenerateJsonSchema):
    def bytes_schema(self, schema) -> dict:
        return {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN}


class _RawBytes(GenerateJsonSchema):
    def bytes_schema(self, schema) -> dict:
        return {"type": "string", "format": "binary"}


_BODY_VARIANTS = ((JSON, _Base64Bytes, ""), (MSGPACK, _RawBytes, "Msgpack"))
REQUEST_COMPONENTS: dict[str, dict] = {}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def body_doc(model) -> dict:
    content = {}
    for media, generator, suffix in _BODY_VARIANTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}" + suffix,
                                         schema_generator=generator)
        for name, sub in schema.pop("$defs", {}).items():
            REQUEST_COMPONENTS[name + suffix] = sub
        REQUEST_COMPONENTS[model.__name__ + suffix] = schema
        content[media] = {"schema": _ref(model.__name__ + suffix)}
    return {"requestBody": {"required": True, "content": content}}


def _both_media(model) -> dict:
    """A response documented for JSON (from `model`) and msgpack (the reply follows Accept)."""
    return {"model": model, "content": {MSGPACK: {"schema": _ref(model.__name__)}}}


ERROR_RESPONSES = {status: _both_media(ErrorBody) for status in (401, 404, 413, 422, 500, 503)}


def responses(model) -> dict:
    """The `responses` of a route answering `model` (200) or our error body."""
    return {200: {"content": {MSGPACK: {"schema": _ref(model.__name__)}}}, **ERROR_RESPONSES}


api = FastAPI(
    title="biprompt-serve",
    version="1",
    summary="BiPrompt-SAM: SAM point prompts + EVF-SAM text masks, selected by IoU",
    description="Bodies are JSON (image bytes as base64) or `application/msgpack` (raw bytes). "
    "Masks are COCO compressed RLE unless `mask_format` says png or none. Every error body is "
    '`{"error": {"type", "message", "request_id"}}`.',
)
_fastapi_openapi = api.openapi


def _openapi() -> dict:
    if api.openapi_schema is None:
        doc = _fastapi_openapi()
        doc.setdefault("components", {}).setdefault("schemas", {}).update(REQUEST_COMPONENTS)
    return api.openapi_schema


api.openapi = _openapi


def _cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, unwrapped from Ray's RayTaskError."""
    while isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def as_api_error(exc: BaseException) -> BiPromptError:
    exc = _cause(exc)
    if isinstance(exc, BiPromptError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError("the model queues are full; retry shortly")
    if isinstance(exc, DeploymentUnavailableError):
        return OverloadedError("a model deployment is unavailable; retry shortly", 5.0)
    if (gone := lost_replica(exc)) is not None:
        return OverloadedError(f"a model replica went away mid-request ({type(gone).__name__}); "
                               "Serve is starting a new one: retry shortly", REPLICA_RETRY_S)
    if isinstance(exc, RequestValidationError):
        return InvalidInputError("; ".join(str(e.get("msg")) for e in exc.errors()[:5]))
    if isinstance(exc, ValidationError):
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                         for e in exc.errors()[:5])
        return InvalidInputError(errs)
    if isinstance(exc, WireError):
        return InvalidInputError(str(exc))
    log.exception("internal error", exc_info=exc)
    return BiPromptError(f"internal error ({type(exc).__name__}); the request id is in the logs")


_REPR = re.compile(r"\s*<[^<>\n]{1,200}? at 0x[0-9a-fA-F]+>")
_DEFAULT_MESSAGES = {401: "missing or wrong API key", 404: "not found",
                     405: "method not allowed", 413: "request too large",
                     422: "invalid request", 503: "overloaded; retry shortly"}


def clean_message(message: object, status: int) -> str:
    """A message fit for a caller: no object reprs (`<_io.BytesIO object at 0x...>`, which
    PIL's UnidentifiedImageError carries), never empty."""
    text = _REPR.sub("", str(message or "")).strip().rstrip(":").strip()
    return text or _DEFAULT_MESSAGES.get(status, f"internal error (HTTP {status})")


def error_info(err: BiPromptError, request_id: str | None) -> dict:
    return {"type": err.type, "message": clean_message(err.message, err.status_code),
            "request_id": request_id}


@api.middleware("http")
async def _request_context(request: Request, call_next):
    # One id for the body and the header: Serve's proxy forwards the caller's X-Request-ID (or
    # one it made) and echoes that value on the response, so the body carries the same value.
    request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    try:
        return await call_next(request)
    except Exception as exc:  # noqa: BLE001 - the handler of last resort: our body, never text
        return _last_resort(request, exc)


def _last_resort(request: Request, exc: Exception) -> Response:
    err = as_api_error(exc)
    log.error("request %r answered %d after %s", getattr(request.state, "request_id", None),
              err.status_code, type(exc).__name__)
    return error_response(request, err)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    # reached only by what escapes the middleware above (Starlette answers it here, then
    # re-raises it for the server's log)
    return _last_resort(request, exc)


@api.exception_handler(BiPromptError)
@api.exception_handler(RequestValidationError)
@api.exception_handler(StarletteHTTPException)
async def _api_error(request: Request, exc: Exception):
    if isinstance(exc, StarletteHTTPException):  # e.g. unknown route or method
        err = BiPromptError(str(exc.detail or ""))
        err.status_code, err.type = exc.status_code, "http_error"
        return error_response(request, err, dict(exc.headers or {}))  # 405: Allow
    return error_response(request, as_api_error(exc))


def error_response(request: Request, err: BiPromptError, headers: dict | None = None) -> Response:
    rid = getattr(request.state, "request_id", None)
    headers = dict(headers or {})
    if isinstance(err, OverloadedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    if isinstance(err, UnauthorizedError):
        headers["WWW-Authenticate"] = getattr(err, "challenge", "Bearer")
    media = reply_media(request)
    return Response(encode_body({"error": error_info(err, rid)}, media), err.status_code,
                    headers=headers, media_type=media)


def reply_media(request: Request) -> str:
    accept = request.headers.get("accept", "")
    if "msgpack" in accept:
        return MSGPACK
    if "json" in accept:
        return JSON
    return media_type(request.headers.get("content-type"))

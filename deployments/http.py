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
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from biprompt.errors import BiPromptError, InvalidInputError, OverloadedError, UnauthorizedError

log = logging.getLogger("biprompt.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PATHS = {"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}


def body_doc(model) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {
        JSON: {"schema": schema}, MSGPACK: {"schema": schema}}}}


ERROR_RESPONSES = {status: {"model": ErrorBody} for status in (401, 404, 413, 422, 503)}

api = FastAPI(
    title="biprompt-serve",
    version="1",
    summary="BiPrompt-SAM: SAM point prompts + EVF-SAM text masks, selected by IoU",
    description="Bodies are JSON (image bytes as base64) or `application/msgpack` (raw bytes). "
    "Masks are COCO compressed RLE unless `mask_format` says png or none. Every error body is "
    '`{"error": {"type", "message", "request_id"}}`.',
)


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


def error_info(err: BiPromptError, request_id: str | None) -> dict:
    return {"type": err.type, "message": err.message, "request_id": request_id}


@api.middleware("http")
async def _request_context(request: Request, call_next):
    rid = request.headers.get("x-request-id", "")
    request.state.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
    # Serve's proxy forwards (or makes) the X-Request-ID and echoes it on the response
    return await call_next(request)


@api.exception_handler(BiPromptError)
@api.exception_handler(RequestValidationError)
@api.exception_handler(StarletteHTTPException)
async def _api_error(request: Request, exc: Exception):
    if isinstance(exc, StarletteHTTPException):  # e.g. unknown route or method
        err = BiPromptError(str(exc.detail))
        err.status_code, err.type = exc.status_code, "http_error"
        return error_response(request, err)
    return error_response(request, as_api_error(exc))


def error_response(request: Request, err: BiPromptError) -> Response:
    rid = getattr(request.state, "request_id", None)
    headers = {}
    if isinstance(err, OverloadedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    if isinstance(err, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
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

"""Error responses: every error body is `{"error": {"message", "type", "param", "code"}}`.

Handlers installed by `install_error_handlers` turn FastAPI's 422 validation errors and
malformed JSON into 400, unknown routes into 404, and uncaught exceptions into 500, all in the
same shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}

_PARAM_NAMES = {f for f in SamplingParams.__dataclass_fields__} | {
    "max_completion_tokens", "top_logprobs", "response_format", "tool_choice", "modalities",
    "audio", "suffix", "best_of", "logit_bias", "prompt", "messages", "model", "echo",
    "priority", "structured_outputs", "tools", "parallel_tool_calls",
    "chat_template_kwargs", *(f"guided_{k}" for k in (
        "json", "regex", "choice", "grammar", "json_object", "decoding_backend",
        "whitespace_pattern")),
}


class APIError(Exception):
    """Raised by handlers; rendered as the OpenAI error body with `status`."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
        err_type: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers  # e.g. Retry-After on a 503


def error_body(message: str, err_type: str, param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(
    message: str, status: int = 400, param: str | None = None, code: str | None = None,
    err_type: str | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:
    err_type = err_type or _TYPES.get(status, "invalid_request_error")
    return JSONResponse(error_body(message, err_type, param, code), status_code=status,
                        headers=headers)


def bad_request_from_value_error(e: ValueError) -> APIError:
    """A ValueError from validation; its first word names the field when it is one."""
    message = str(e) or type(e).__name__
    head = message.split(" ", 1)[0].rstrip(":")
    param = head if head.split(".", 1)[0] in _PARAM_NAMES else None
    code = "context_length_exceeded" if "maximum context length" in message else None
    return APIError(message, 400, param=param, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", first.get("msg", ""))
        return f"Malformed JSON in request body: {detail}", None
    # For unions pydantic prefixes the member type; keep only field names.
    loc = [p for p in loc if not (p[:1].isupper() or "[" in p or p in ("str", "int"))]
    param = ".".join(loc) or None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: {param}", param
    return f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return error_response(message, 400, param=param)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.message, exc.status, exc.param, exc.code, exc.err_type,
                          exc.headers)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 404:
        message = f"Not found: {request.method} {request.url.path}"
    else:
        message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
    return error_response(message, status)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(f"Internal server error: {type(exc).__name__}: {exc}", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

"""The one place that maps exceptions to HTTP responses.

Every error body has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``
where ``code`` is the HTTP status. Messages never echo large request bodies, file paths or
tracebacks; unexpected exceptions are logged here, with their traceback, and answered with a
generic 500.
"""

from __future__ import annotations

import http
import json
import logging
from collections.abc import Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubellm.server.errors import (
    EngineDeadError,
    EngineGenerateError,
    EngineUnavailableError,
    OpenAIError,
)

logger = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 2000
"""Validation messages are truncated to this length (a body with 10^5 bad items stays small)."""
_MAX_ERRORS = 20
"""At most this many validation errors are described in one message."""


def error_body(
    message: str,
    *,
    status: int,
    type: str,  # noqa: A002 - OpenAI's field name
    param: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def error_response(
    message: str,
    *,
    status: int,
    type: str,  # noqa: A002 - OpenAI's field name
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, status=status, type=type, param=param),
        status_code=status,
        headers=headers,
    )


def status_type(status: int) -> str:
    """An OpenAI-style error type for a bare HTTP status, e.g. 404 → "NotFoundError"."""
    known = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        409: "ConflictError",
        413: "RequestTooLargeError",
        422: "UnprocessableEntityError",
        429: "RateLimitError",
        431: "RequestHeaderFieldsTooLargeError",
        503: "ServiceUnavailableError",
    }
    if status in known:
        return known[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """A short message from pydantic's error list: location and message only, no input echo."""
    parts = []
    for item in list(errors)[:_MAX_ERRORS]:
        if not isinstance(item, dict):
            continue
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        msg = str(item.get("msg", "invalid value"))
        if item.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
            loc = []
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more errors")
    message = "; ".join(parts) or "invalid request"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    return message


def _first_param(errors: Sequence[Any]) -> str | None:
    for item in errors:
        if isinstance(item, dict) and item.get("type") != "json_invalid":
            loc = [str(p) for p in item.get("loc", ()) if p != "body"]
            if loc:
                return ".".join(loc)
    return None


async def _validation_error(_request: Request, exc: Exception) -> Response:
    errors = cast(RequestValidationError, exc).errors()
    return error_response(
        describe_validation_errors(errors),
        status=400,
        type="BadRequestError",
        param=_first_param(errors),
    )


async def _http_exception(_request: Request, exc: Exception) -> Response:
    exc = cast(StarletteHTTPException, exc)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else None
    if not detail:
        try:
            detail = http.HTTPStatus(status).phrase
        except ValueError:
            detail = "error"
    if status in (204, 304):
        return Response(status_code=status, headers=exc.headers)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(detail, status=status, type=status_type(status), headers=headers)


async def _known_error(_request: Request, exc: Exception) -> Response:
    return mapped_error_response(exc)


def internal_error_response() -> JSONResponse:
    return error_response(
        "The server had an internal error while processing your request.",
        status=500,
        type="InternalServerError",
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error(
        "unhandled error on %s %s", request.method, request.scope.get("path"), exc_info=exc
    )
    return internal_error_response()


def install_exception_handlers(app: FastAPI) -> None:
    """Register the mapping above on `app` (innermost, next to the router)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    for known in (OpenAIError, EngineGenerateError, EngineDeadError, EngineUnavailableError):
        app.add_exception_handler(known, _known_error)
    app.add_exception_handler(Exception, _unexpected)


class CatchAllMiddleware:
    """Answers any exception that escaped the routes with a generic 500 (logged once, with the
    traceback) instead of letting Starlette re-raise it to uvicorn.

    Added just outside the user middleware, so the outer ones (metrics, request id, CORS) still
    see a response. An exception after the response has started can only end the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if isinstance(
                exc, EngineDeadError | EngineGenerateError | EngineUnavailableError | OpenAIError
            ):
                response = mapped_error_response(exc)
            else:
                logger.error("unhandled error on %s", scope.get("path"), exc_info=exc)
                response = internal_error_response()
            if started:
                return
            await response(scope, receive, send)


def mapped_error_response(exc: Exception) -> JSONResponse:
    """OpenAIError → its status; EngineUnavailableError → 503; EngineDeadError /
    EngineGenerateError → 500."""
    if isinstance(exc, OpenAIError):
        return error_response(exc.message, status=exc.status, type=exc.type, param=exc.param)
    if isinstance(exc, EngineUnavailableError):
        logger.debug("request refused, no engine is ready: %s", exc)
        return error_response(
            EngineUnavailableError.CLIENT_MESSAGE, status=503, type="ServiceUnavailableError"
        )
    if isinstance(exc, EngineDeadError):
        logger.error("request failed, the engine is dead: %s", exc)
        return error_response(
            EngineDeadError.CLIENT_MESSAGE, status=500, type="InternalServerError"
        )
    logger.error("request failed in the engine: %s", exc)
    return error_response(
        "The engine failed to process this request.", status=500, type="InternalServerError"
    )


def json_error_bytes(message: str, *, status: int, type: str) -> bytes:  # noqa: A002
    """The error body as bytes, for pure ASGI middleware that answers before the app runs."""
    return json.dumps(error_body(message, status=status, type=type)).encode()

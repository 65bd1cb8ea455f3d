"""Pure ASGI middleware: request limits, request ids, API-key auth, draining, user middleware.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses pass through untouched and the
limits hold whatever HTTP implementation uvicorn runs. The order is composed in `app.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
import logging
import uuid
from collections.abc import Iterable
from typing import Any, cast

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubellm.server.handlers import json_error_bytes

logger = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/ping", "/ready", "/version", "/metrics", "/load"})
"""Routes that answer while the server drains (each decides its own status)."""
AUTH_EXEMPT_PATHS = frozenset(
    {"/health", "/ping", "/ready", "/version", "/metrics", "/docs", "/redoc", "/openapi.json"}
)
"""The explicit allowlist of routes that need no API key; everything else does."""


async def send_error(
    send: Send,
    status: int,
    message: str,
    type: str,  # noqa: A002 - OpenAI's field name
    *,
    close: bool = False,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete OpenAI-style JSON error response."""
    body = json_error_bytes(message, status=status, type=type)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_path(scope: Scope) -> str:
    """The request path with the ASGI root_path removed, from the scope (never from the Host
    header: `request.url` can be made to lie with `Host: x/health?`)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class LimitsMiddleware:
    """431 for oversized or too many headers; 413 for bodies over the limit.

    Content-Length over the limit is refused before any body is read. Streamed (chunked)
    bodies are counted as they arrive; past the limit the app sees a disconnect and whatever
    it would have answered is replaced by 413.
    """

    def __init__(
        self, app: ASGIApp, *, max_header_bytes: int, max_header_count: int, max_body_bytes: int
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if len(headers) > self.max_header_count or size > self.max_header_bytes:
            await send_error(
                send,
                431,
                f"Request headers too large (at most {self.max_header_count} headers and "
                f"{self.max_header_bytes} bytes).",
                "RequestHeaderFieldsTooLargeError",
                close=True,
            )
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(
                    send, 400, "Invalid Content-Length.", "BadRequestError", close=True
                )
                return
            if declared > self.max_body_bytes:
                await self._too_large(send)
                return
        await self._guard_body(scope, receive, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"Request body too large (at most {self.max_body_bytes} bytes).",
            "RequestTooLargeError",
            close=True,
        )

    async def _guard_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        over = False
        app_started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started
            if over and not app_started:
                return  # the app's answer to a cut-off body is replaced by 413 below
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if over and not app_started:
            await self._too_large(send)


class RequestIdMiddleware:
    """Echo the client's X-Request-Id on the response, or create one (uuid4 hex)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    """Require `Authorization: Bearer <key>` on every route except the allowlist and OPTIONS.

    Decided on the scope's path (root_path removed); keys are compared in constant time.
    """

    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in api_keys]
        if not self._digests:
            raise ValueError("ApiKeyMiddleware needs at least one key")

    def _authorized(self, scope: Scope) -> bool:
        raw = _header(scope, b"authorization")
        if raw is None:
            return False
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = _digest(token.strip())
        ok = False
        for expected in self._digests:
            ok |= hmac.compare_digest(given, expected)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        exempt = scope.get("method") == "OPTIONS" or route_path(scope) in AUTH_EXEMPT_PATHS
        if exempt or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(
            send,
            401,
            "Invalid or missing API key.",
            "AuthenticationError",
            extra_headers=[(b"www-authenticate", b"Bearer")],
        )


class DrainingMiddleware:
    """Refuses new non-probe requests with 503 once `state.draining` is set (SIGTERM). The
    state is read from `app.state.kubellm` per request; before it is set, requests pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) not in PROBE_PATHS:
            state = _server_state(scope)
            if state is not None and state.draining:
                await send_error(
                    send, 503, "The server is shutting down.", "ServiceUnavailableError", close=True
                )
                return
        await self.app(scope, receive, send)


def _server_state(scope: Scope) -> Any:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "kubellm", None)


def import_attribute(path: str) -> Any:
    """Import "module:attribute" (or "module.attribute"), with a clear error."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"--middleware {path!r}: expected an import path 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--middleware {path!r}: cannot import {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"--middleware {path!r}: {module_name!r} has no {attr!r}") from None


def add_user_middleware(app: FastAPI, paths: Iterable[str]) -> None:
    """A class is added with app.add_middleware; an async function(request, call_next)
    becomes an @app.middleware("http")."""
    for path in paths:
        obj = import_attribute(path)
        if inspect.isclass(obj):
            app.add_middleware(cast(Any, obj))
        elif inspect.iscoroutinefunction(obj):
            app.middleware("http")(obj)
        else:
            raise ValueError(
                f"--middleware {path!r}: expected an ASGI middleware class or an async "
                f"function(request, call_next), got {type(obj).__name__}"
            )
        logger.info("added user middleware %s", path)

"""User middleware loaded by `kubellm serve --middleware` in test_http_limits.py (this
directory is put on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def add_function_header(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers["x-user-function"] = "1"
    return response


class AddClassHeader:
    """A pure ASGI middleware class."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-user-class", b"1")]}
            await send(message)

        await self.app(scope, receive, send_with_header)

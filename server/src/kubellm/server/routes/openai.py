"""POST /v1/completions and POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from fastapi import APIRouter, Request
from starlette.responses import Response

from kubellm.server.openai.chat import create_chat_completion
from kubellm.server.openai.completions import create_completion
from kubellm.server.openai.protocol import ChatCompletionRequest, CompletionRequest
from kubellm.server.state import ServerState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])

CLIENT_CLOSED_REQUEST = 499
"""Status logged for a non-streaming request whose client went away (never sent)."""


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.kubellm
    return state


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (which aborts its engine requests) if the client goes away.

    Streaming responses need no such guard: Starlette cancels their body generator itself.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.info("client disconnected from %s; its request was aborted", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    work = create_completion(server_state(request), body)
    return await (work if body.stream else cancel_on_disconnect(request, work))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    work = create_chat_completion(server_state(request), body)
    return await (work if body.stream else cancel_on_disconnect(request, work))

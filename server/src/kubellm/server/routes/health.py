"""Probe routes: /health, /ping, /version, /load.

/health (and /ping, for SageMaker-style probes) is 200 with an empty body while the engine is
healthy, and 503 with an OpenAI-style error once the engine is dead or the server is draining.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from kubellm.server.errors import EngineDeadError
from kubellm.server.handlers import error_response
from kubellm.server.state import ServerState

logger = logging.getLogger(__name__)

router = APIRouter()


def server_state(request: Request) -> ServerState | None:
    state = getattr(request.app.state, "kubellm", None)
    return state if isinstance(state, ServerState) else None


def _unavailable(message: str) -> Response:
    return error_response(message, status=503, type="ServiceUnavailableError")


async def _health(request: Request) -> Response:
    state = server_state(request)
    if state is None:
        return _unavailable("The server is starting.")
    if state.draining:
        return _unavailable("The server is shutting down.")
    try:
        await state.engine.check_health()
    except EngineDeadError as e:
        logger.debug("health check failed: %s", e)
        return _unavailable(EngineDeadError.CLIENT_MESSAGE)
    return Response(status_code=200)


@router.get("/health", include_in_schema=False)
async def health(request: Request) -> Response:
    return await _health(request)


@router.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
async def ping(request: Request) -> Response:
    return await _health(request)


@cache
def server_version() -> str:
    try:
        return version("kubellm-server")
    except PackageNotFoundError:
        return "unknown"


@router.get("/version")
async def show_version() -> JSONResponse:
    return JSONResponse({"version": server_version()})


@router.get("/load")
async def load(request: Request) -> JSONResponse:
    state = server_state(request)
    return JSONResponse({"server_load": state.server_load if state is not None else 0})

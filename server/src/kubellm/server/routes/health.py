"""Probe routes: /health, /ping, /ready, /version, /load.

/health (and /ping, for SageMaker-style probes) is liveness: 200 with an empty body unless the
server is draining or an engine this process spawned died (then 503 with an OpenAI-style error,
and the watchdog exits 1). /ready is readiness: 200 with a small JSON while at least
--min-ready-engines engines are ready, 503 naming how many are otherwise. Remote engines coming
and going change /ready, never /health (docs/design/0003-scale-out.md, "HTTP probe paths").
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

STARTING = "The server is starting."


def server_state(request: Request) -> ServerState | None:
    state = getattr(request.app.state, "kubellm", None)
    return state if isinstance(state, ServerState) else None


def _unavailable(message: str) -> Response:
    return error_response(message, status=503, type="ServiceUnavailableError")


async def _not_alive(state: ServerState | None) -> Response | None:
    """The 503 response when the process is not live (starting, draining, engine dead)."""
    if state is None:
        return _unavailable(STARTING)
    if state.draining:
        return _unavailable("The server is shutting down.")
    try:
        await state.engine.check_health()
    except EngineDeadError as e:
        logger.debug("health check failed: %s", e)
        return _unavailable(EngineDeadError.CLIENT_MESSAGE)
    return None


async def _health(request: Request) -> Response:
    return await _not_alive(server_state(request)) or Response(status_code=200)


@router.get("/health", include_in_schema=False)
async def health(request: Request) -> Response:
    return await _health(request)


@router.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
async def ping(request: Request) -> Response:
    return await _health(request)


@router.get("/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    """Readiness: enough engines are ready and the server is live and not draining."""
    state = server_state(request)
    if state is None:
        return _unavailable(STARTING)
    not_alive = await _not_alive(state)
    if not_alive is not None:
        return not_alive
    parallel = state.settings.parallel
    counts = {
        "ready": state.engine.num_ready,
        "required": parallel.required_engines,
        "expected": parallel.data_parallel_size,
    }
    if state.engine.ready:
        return JSONResponse({"ready": True, "engines": counts})
    return _unavailable(
        f"{counts['ready']} of {counts['expected']} engines ready (need {counts['required']})"
    )


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

"""Compose the FastAPI application: routers by supported task, exception handlers, middleware.

Nothing here handles requests; each endpoint family lives in its own module under `routes/`.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, FastAPI
from starlette.middleware.cors import CORSMiddleware

from kubellm.protocol.settings import FrontendSettings, ServeSettings
from kubellm.server import handlers, metrics, middleware
from kubellm.server.routes import health
from kubellm.server.state import ServerState


def task_routers(supported_tasks: Iterable[str]) -> list[APIRouter]:
    """The routers serving each engine task ("generate": the OpenAI API)."""
    routers: list[APIRouter] = []
    if "generate" in supported_tasks:
        from kubellm.server.routes import models, openai, tokenize

        routers += [openai.router, tokenize.router, models.router]
    return routers


def build_app(
    settings: ServeSettings | ServerState,
    supported_tasks: Iterable[str],
    *,
    prometheus: metrics.PrometheusMetrics | None = None,
) -> FastAPI:
    """The application for these settings and tasks. The launcher stores the `ServerState`
    on `app.state.kubellm` afterwards (or here, when a state is given)."""
    if isinstance(settings, ServerState):
        state: ServerState | None = settings
        frontend = settings.settings.frontend
    else:
        state, frontend = None, settings.frontend
    docs = not frontend.disable_fastapi_docs
    app = FastAPI(  # --root-path is given to uvicorn (FastAPI's own setting is deprecated)
        title="kubellm",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(health.router)
    app.include_router(metrics.router)
    for router in task_routers(supported_tasks):
        app.include_router(router)
    handlers.install_exception_handlers(app)
    add_middleware(app, frontend, prometheus)
    app.state.metrics = prometheus
    if state is not None:
        app.state.kubellm = state
    return app


def add_middleware(
    app: FastAPI, frontend: FrontendSettings, prometheus: metrics.PrometheusMetrics | None
) -> None:
    """Innermost first: each add_middleware call wraps the ones before it."""
    middleware.add_user_middleware(app, frontend.middleware)
    app.add_middleware(handlers.CatchAllMiddleware)
    app.add_middleware(middleware.DrainingMiddleware)
    if frontend.api_key:
        app.add_middleware(middleware.ApiKeyMiddleware, api_keys=frontend.api_key)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(frontend.allowed_origins),
        allow_credentials=frontend.allow_credentials,
        allow_methods=list(frontend.allowed_methods),
        allow_headers=list(frontend.allowed_headers),
    )
    if frontend.enable_request_id_headers:
        app.add_middleware(middleware.RequestIdMiddleware)
    if prometheus is not None:
        app.add_middleware(metrics.HttpMetricsMiddleware, metrics=prometheus)
    app.add_middleware(
        middleware.LimitsMiddleware,
        max_header_bytes=frontend.max_header_bytes,
        max_header_count=frontend.max_header_count,
        max_body_bytes=frontend.max_request_body_bytes,
    )

"""`run_server`: the single shape of `kubellm serve` (one API server process that hosts the
coordinator and spawns its engine cores), its start-up phases, the watchdog and graceful shutdown.

Phases (mirroring vLLM's run_server / serve_http):
  0. a temporary SIGTERM handler raises KeyboardInterrupt("terminated"), so a SIGTERM during
     model load unwinds `start_head` (the engines are stopped, no orphan);
  1. validate (and find the model directory: the tokenizer comes from the head's own copy);
  2. bind the listening socket (not yet listening: connections are refused while the local
     engines load); 3. start the head (address plan, coordinator, local engines, engine client)
  and wait for the local engines; 4. supported tasks; 5. build the app; 6. init the state;
  7. serve with uvicorn on the bound socket, with the watchdog and the SIGINT/SIGTERM drain;
  finally shut the engines down, then close the socket.

With remote engines (`--data-parallel-size-local` below `--data-parallel-size`) phase 3 waits
only for the local ones: the server listens at once and answers 503 until an engine is ready.
Phases 4-7 (`serve_api`) are shared with the multi shape's API servers (`supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from kubellm.engine.model_files import DEFAULT_MODEL_NAME, resolve_model
from kubellm.protocol.settings import FrontendSettings, ParallelSettings, ServeSettings
from kubellm.server.app import build_app
from kubellm.server.engine_client import EngineClient
from kubellm.server.errors import EngineStartupError, EngineUnavailableError
from kubellm.server.head import start_head
from kubellm.server.metrics import PrometheusMetrics
from kubellm.server.middleware import import_attribute
from kubellm.server.state import ServerState
from kubellm.server.tokenizer import Tokenizer, resolve_chat_template

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
DEFAULT_TASKS = ("generate",)
"""Supported tasks assumed while no engine is ready to say (a head waiting for engines)."""


def interrupt_startup(signum: int, frame: FrameType | None) -> None:
    """The start-up SIGTERM handler: unwind like Ctrl-C, so context managers stop children."""
    raise KeyboardInterrupt("terminated")


def run_server(settings: ServeSettings) -> int:
    """Run `kubellm serve` (single shape) until it is stopped; returns the process exit code."""
    return run_phases(serve(settings))


def run_phases(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run(main), mapping start-up failures and interrupts to exit codes. Until the
    serving phase installs its own handlers, SIGTERM unwinds like Ctrl-C (phase 0)."""
    previous = signal.signal(signal.SIGTERM, interrupt_startup)
    try:
        return asyncio.run(main)
    except KeyboardInterrupt as e:
        logger.info("interrupted (%s); exiting", e or "SIGINT")
        return EXIT_OK
    except EngineStartupError as e:
        logger.error("the engine failed to start: %s", e)
        return EXIT_FAILURE
    except StartupError as e:
        logger.error("cannot start: %s", e)
        return EXIT_FAILURE
    except ValueError as e:  # e.g. an engine address that is not this host's
        logger.debug("start-up failed", exc_info=e)
        logger.error("cannot start: %s", e)
        return EXIT_FAILURE
    except Exception:
        logger.exception("kubellm serve failed")
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


class StartupError(Exception):
    """A configuration problem found before or while starting (bad flag value, files)."""


async def serve(settings: ServeSettings) -> int:
    model_dir = validate(settings)  # phase 1
    sock = bind_socket(settings.frontend)  # phase 2
    raise_nofile_limit()
    try:
        metrics = PrometheusMetrics(
            served_model_names(settings, str(model_dir))[0],
            max_model_len=settings.engine.max_model_len,
        )
        async with start_head(settings, metrics) as engine:  # phase 3
            return await serve_api(settings, engine, metrics, sock, model_dir)
    finally:
        close_socket(sock, settings.frontend.uds)


async def serve_api(
    settings: ServeSettings,
    engine: EngineClient,
    metrics: PrometheusMetrics,
    sock: socket.socket,
    model_dir: Path,
) -> int:
    """Phases 4-7 on a started engine client and a bound socket; returns the exit code."""
    supported = supported_tasks(engine)  # phase 4
    app = build_app(settings, supported, prometheus=metrics)  # phase 5
    state = init_app_state(app, settings, engine, supported, metrics, model_dir)  # phase 6
    return await serve_http(app, state, sock)  # phase 7


def validate(settings: ServeSettings) -> Path:
    """Checks that need the file system or imports (the settings model checked the rest).
    Returns the model directory the tokenizer is read from (the engines check the weights and
    report why they cannot load them)."""
    frontend = settings.frontend
    for flag, path in (
        ("--ssl-keyfile", frontend.ssl_keyfile),
        ("--ssl-certfile", frontend.ssl_certfile),
        ("--ssl-ca-certs", frontend.ssl_ca_certs),
    ):
        if path and not Path(path).is_file():
            raise StartupError(f"{flag}: no such file: {path}")
    for path in frontend.middleware:
        try:
            import_attribute(path)
        except ValueError as e:
            raise StartupError(str(e)) from None
    return head_model_dir(settings)


def head_model_dir(settings: ServeSettings) -> Path:
    """This host's copy of the model directory (resolve_model: torch-free)."""
    try:
        return resolve_model(settings.engine.model)
    except (ValueError, OSError) as e:  # reported as before, when the engine found it
        raise EngineStartupError(str(e)) from None


def supported_tasks(engine: EngineClient) -> tuple[str, ...]:
    """The first ready engine's tasks; DEFAULT_TASKS while none is ready."""
    try:
        return tuple(engine.facts.supported_tasks)
    except EngineUnavailableError:
        logger.info("no engine is ready yet; assuming tasks %s", list(DEFAULT_TASKS))
        return DEFAULT_TASKS


def served_model_names(settings: ServeSettings, model_dir: str) -> tuple[str, ...]:
    """--served-model-name; else the embedded model's own name when no model was given; else
    the basename of the model directory."""
    if settings.frontend.served_model_name:
        return settings.frontend.served_model_name
    if settings.engine.model is None:
        return (DEFAULT_MODEL_NAME,)
    return (Path(model_dir).name,)


def init_app_state(
    app: FastAPI,
    settings: ServeSettings,
    engine: EngineClient,
    supported_tasks: tuple[str, ...],
    metrics: PrometheusMetrics,
    model_dir: Path,
) -> ServerState:
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
        chat_template = resolve_chat_template(settings.frontend.chat_template, tokenizer)
    except ValueError as e:
        raise StartupError(str(e)) from e
    names = served_model_names(settings, str(model_dir))
    metrics.set_model_name(names[0])
    state = ServerState(
        settings=settings,
        engine=engine,
        tokenizer=tokenizer,
        served_model_names=names,
        supported_tasks=supported_tasks,
        stats=metrics,
        chat_template=chat_template,
    )
    app.state.kubellm = state
    logger.info(
        "serving model %s as %s, tasks %s", model_dir, ", ".join(names), ", ".join(supported_tasks)
    )
    log_engines(engine, settings.parallel)
    return state


def log_engines(engine: EngineClient, parallel: ParallelSettings) -> None:
    """One line about the engines ready now (none yet for a head waiting for remote ones)."""
    try:
        facts = engine.facts
    except EngineUnavailableError:
        logger.info(
            "0 of %d engines ready (need %d); answering 503 until one is",
            parallel.data_parallel_size,
            parallel.required_engines,
        )
        return
    logger.info(
        "engine ready (%d of %d): model %s, max_model_len %d, %d KV blocks of %d tokens, %s/%s",
        engine.num_ready,
        parallel.data_parallel_size,
        facts.model,
        facts.max_model_len,
        facts.num_kv_blocks,
        facts.block_size,
        facts.device,
        facts.dtype,
    )


def keep_alive_on_engine_death() -> bool:
    value = os.environ.get("KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------- phase 2: bind


def bind_socket(frontend: FrontendSettings) -> socket.socket:
    """Bind (not listen: uvicorn listens once the engine is ready) the HTTP socket."""
    if frontend.uds:
        sock = _bind_uds(frontend.uds)
    else:
        sock = _bind_tcp(frontend.host, frontend.port)
    logger.info("bound %s", describe_address(sock))
    return sock


def _bind_uds(path: str) -> socket.socket:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"--uds: {path} exists and is not a socket")
        os.unlink(path)  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError(f"--uds: cannot bind {path}: {e}") from e
    return sock


def _bind_tcp(host: str | None, port: int) -> socket.socket:
    address = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot bind {address} port {port}: {e}") from e
    return sock


def describe_address(sock: socket.socket, *, tls: bool = False) -> str:
    """http(s)://host:port (IPv6 as [addr]:port), or unix:PATH."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    scheme = "https" if tls else "http"
    host, port = name[0], name[1]
    return (
        f"{scheme}://[{host}]:{port}"
        if sock.family == socket.AF_INET6
        else f"{scheme}://{host}:{port}"
    )


def close_socket(sock: socket.socket, uds: str | None) -> None:
    sock.close()
    if uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uds)


def raise_nofile_limit() -> None:
    """Raise the open-files soft limit to the hard limit (one fd per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        logger.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
    else:
        logger.debug("raised RLIMIT_NOFILE from %d to %d", soft, hard)


# ---------------------------------------------------------------------------- phase 7: serve

H11_MAX_INCOMPLETE_EVENT_SIZE = 4 * 1024 * 1024
"""h11's own header-block cap; our ASGI limit (--max-header-bytes, 431) is below it."""
GRACEFUL_CLOSE_TIMEOUT_S = 5.0
"""After the drain, how long uvicorn waits for connections to finish before cancelling."""


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher drains on SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: FastAPI, frontend: FrontendSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="h11",
        lifespan="auto",
        log_config=None,
        log_level=frontend.uvicorn_log_level,
        access_log=not frontend.disable_uvicorn_access_log,
        timeout_keep_alive=int(max(1, round(frontend.timeout_keep_alive))),
        timeout_graceful_shutdown=int(GRACEFUL_CLOSE_TIMEOUT_S),
        root_path=frontend.root_path,
        ssl_keyfile=frontend.ssl_keyfile,
        ssl_certfile=frontend.ssl_certfile,
        ssl_ca_certs=frontend.ssl_ca_certs,
        ssl_cert_reqs=frontend.ssl_cert_reqs,
        h11_max_incomplete_event_size=max(
            H11_MAX_INCOMPLETE_EVENT_SIZE, 2 * frontend.max_header_bytes
        ),
    )


def log_routes(app: FastAPI) -> None:
    logger.info("routes: %s", "; ".join(describe_routes(app.routes)))


def describe_routes(routes: Iterable[Any]) -> list[str]:
    """ "METHODS /path" for each route, descending into included routers."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            out += describe_routes(included.routes)
            continue
        methods = sorted(m for m in getattr(route, "methods", None) or () if m != "HEAD")
        out.append(f"{','.join(methods) or '*'} {getattr(route, 'path', '?')}")
    return out


async def serve_http(app: FastAPI, state: ServerState, sock: socket.socket) -> int:
    """Serve until a signal drains the server or the watchdog sees the engine die."""
    frontend = state.settings.frontend
    server = SignalFreeServer(uvicorn_config(app, frontend))
    drain = Drain(server, state)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, drain.on_signal, sig)
    watchdog = asyncio.create_task(watchdog_loop(server, state, frontend.watchdog_interval_s))
    watchdog.add_done_callback(_log_watchdog_failure)
    log_routes(app)
    logger.info("serving on %s", describe_address(sock, tls=bool(frontend.ssl_certfile)))
    try:
        await server.serve(sockets=[sock])
    finally:
        # The signal handlers stay until the loop closes: a signal during the engine shutdown
        # that follows only finds the drain already done.
        watchdog.cancel()
        await drain.cancel()
    fired = watchdog.done() and not watchdog.cancelled() and watchdog.exception() is None
    if fired or (state.engine.errored and not drain.started):
        logger.error("exiting non-zero: the engine died")
        return EXIT_FAILURE
    logger.info("HTTP server stopped; shutting the engine down")
    return EXIT_OK


def _log_watchdog_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the watchdog failed", exc_info=task.exception())


async def watchdog_loop(server: uvicorn.Server, state: ServerState, interval: float) -> None:
    """End the process (non-zero) soon after the engine dies, unless told to keep it alive.

    Streaming responses cannot turn an engine death into an HTTP error (200 was sent), so this
    is the one path by which a dead engine reliably takes the pod down.
    """
    keep_alive = keep_alive_on_engine_death()
    warned = False
    while True:
        await asyncio.sleep(interval)
        if not state.engine.errored:
            continue
        if keep_alive:
            if not warned:
                logger.error(
                    "engine died: %s; staying up (KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH)",
                    state.engine.dead_error,
                )
                warned = True
            continue
        logger.error("engine died: %s; exiting", state.engine.dead_error)
        server.should_exit = True
        return


class Drain:
    """SIGINT/SIGTERM: refuse new requests (503), let in-flight ones finish for up to
    --shutdown-timeout seconds, abort the rest (their streams end with finish_reason "abort"),
    then stop uvicorn. A second signal stops at once."""

    ABORT_GRACE_S = 3.0
    """After aborting, how long aborted streams get to send their final chunk."""

    def __init__(self, server: uvicorn.Server, state: ServerState) -> None:
        self.server = server
        self.state = state
        self.timeout = state.settings.frontend.shutdown_timeout
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._task is None:
            logger.info(
                "%s: draining; %d request(s) in flight, waiting up to %.1fs",
                name,
                self.in_flight(),
                self.timeout,
            )
            self.state.draining = True
            self._task = asyncio.create_task(self._run())
            return
        logger.warning("%s again: shutting down now", name)
        self._task.cancel()
        self._task = asyncio.create_task(self._abort_all())
        self.server.should_exit = True
        self.server.force_exit = True

    def in_flight(self) -> int:
        return max(self.state.server_load, self.state.engine.num_in_flight)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + self.timeout
            while self.in_flight() > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self.in_flight() > 0:
                logger.info("shutdown timeout: aborting %d request(s)", self.in_flight())
                await self._abort_all()
                deadline = loop.time() + self.ABORT_GRACE_S
                while self.in_flight() > 0 and loop.time() < deadline:
                    await asyncio.sleep(0.05)
            logger.info("drained; stopping the HTTP server")
        finally:
            self.server.should_exit = True

    async def _abort_all(self) -> None:
        ids = self.state.engine.in_flight_request_ids()
        if not ids:
            return
        try:
            await self.state.engine.abort(ids)
        except Exception as e:  # the engine may be dying too; stopping matters more
            logger.warning("could not abort %d request(s): %s", len(ids), e)

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

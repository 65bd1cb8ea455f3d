"""The headless host's view of its engines: a PULL for their `EngineStatus` and `Heartbeat`
messages and the HTTP endpoint the kubelet probes (docs/design/0003-scale-out.md).

    monitor = EngineMonitor(ranks=(2, 3), heartbeat_timeout_s=15)
    monitor.bind("ipc:///tmp/kubellm-monitor-x/monitor")
    task = asyncio.create_task(monitor.run())
    app = build_monitor_app(monitor)   # /health, /ping, /ready, /metrics

/health, /ping and /ready are 200 while every local engine's last status is "ready" and its
last heartbeat is younger than --engine-heartbeat-timeout-s; otherwise 503 with an OpenAI-style
error naming each engine that is not, with its state and detail. A "draining" engine (stopping
gracefully) is healthy but not ready, and so are all engines once the host is `stopping`:
/health and /ping stay 200 until the engines exit, /ready turns 503. /metrics is Prometheus
text from the monitor's own registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

from kubellm.engine.transport import set_socket_options
from kubellm.protocol.codec import BadFrame, engine_to_monitor_decoder
from kubellm.protocol.messages import EngineState, EngineStatus, EngineToMonitor, Heartbeat
from kubellm.server.handlers import error_response

logger = logging.getLogger(__name__)

ENGINE_STATES: tuple[str, ...] = get_args(EngineState)
_MONITOR_HWM = 1_000


@dataclass
class _Engine:
    """What the monitor knows about one local rank."""

    status: EngineStatus | None = None
    beat: Heartbeat | None = None
    beat_at: float | None = None
    """time.monotonic() when `beat` arrived (engine clocks are not compared with ours)."""


class EngineMonitor:
    """Per-rank latest `EngineStatus` and `Heartbeat` of this host's engines."""

    def __init__(self, ranks: Iterable[int], heartbeat_timeout_s: float) -> None:
        self.ranks = tuple(ranks)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stopping = False
        """Set on SIGTERM: /ready answers 503 while the engines drain and stop."""
        self._engines = {rank: _Engine() for rank in self.ranks}
        self._decoder = engine_to_monitor_decoder()
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    # -- the link ---------------------------------------------------------------------------

    def bind(self, address: str) -> None:
        """Bind the PULL the engines' monitor PUSHes connect to."""
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        set_socket_options(self._sock, receives=True, hwm=_MONITOR_HWM, linger_ms=0)
        self._sock.bind(address)
        logger.debug("engine monitor listening on %s", address)

    async def run(self) -> None:
        """Receive and record messages until cancelled."""
        if self._sock is None:
            raise RuntimeError("EngineMonitor.bind() was not called")
        while True:
            frame = await self._sock.recv(copy=False)
            try:
                msg = self._decoder.decode(frame.buffer)
            except BadFrame as e:
                logger.warning("dropped a bad frame on the engine monitor link: %s", e)
                continue
            self.feed(msg)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = None

    def feed(self, msg: EngineToMonitor, now: float | None = None) -> None:
        """Record one message (ranks that are not this host's are ignored)."""
        engine = self._engines.get(msg.engine_index)
        if engine is None:
            logger.warning("engine monitor: message from rank %d, not local", msg.engine_index)
            return
        if isinstance(msg, EngineStatus):
            if engine.status is None or engine.status.state != msg.state:
                log = logger.error if msg.state == "failed" else logger.info
                log("engine %d: %s%s", msg.engine_index, msg.state, _detail(msg.detail))
            engine.status = msg
        else:
            engine.beat = msg
            engine.beat_at = time.monotonic() if now is None else now

    # -- queries -----------------------------------------------------------------------------

    def state(self, rank: int) -> str:
        """The rank's last reported state ("unknown" before its first status)."""
        status = self._engines[rank].status
        return status.state if status is not None else "unknown"

    def last_detail(self, rank: int) -> str:
        status = self._engines[rank].status
        return status.detail if status is not None else ""

    def problems(self, now: float | None = None, *, draining_ok: bool = False) -> list[str]:
        """One line per local engine that is not ready and beating; empty when all are.
        With `draining_ok` (liveness), a draining engine counts as ready."""
        now = time.monotonic() if now is None else now
        fine = ("ready", "draining") if draining_ok else ("ready",)
        out = []
        for rank, engine in self._engines.items():
            status = engine.status
            if status is None:
                out.append(f"engine {rank}: no status yet")
            elif status.state not in fine:
                out.append(f"engine {rank}: {status.state}{_detail(status.detail)}")
            elif engine.beat is None or engine.beat_at is None:
                out.append(f"engine {rank}: ready but no heartbeat yet")
            elif engine.beat.incarnation != status.incarnation:
                out.append(f"engine {rank}: heartbeats come from another incarnation")
            elif now - engine.beat_at > self.heartbeat_timeout_s:
                out.append(f"engine {rank}: no heartbeat for {now - engine.beat_at:.1f} s")
        return out

    def stats(self, rank: int) -> Heartbeat | None:
        return self._engines[rank].beat


def _detail(detail: str) -> str:
    return f" ({detail})" if detail else ""


# -- HTTP ------------------------------------------------------------------------------------


class MonitorMetrics:
    """Prometheus gauges of the local engines, refreshed on each scrape (own registry)."""

    def __init__(self, monitor: EngineMonitor) -> None:
        self.monitor = monitor
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = Gauge(
            "kubellm:engine_state",
            "1 for the engine's current state, 0 for the others.",
            ("engine", "state"),
            registry=r,
        )
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests in the engine's running batch.",
            ("engine",),
            registry=r,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            ("engine",),
            registry=r,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0..1).",
            ("engine",),
            registry=r,
        )

    def render(self) -> bytes:
        for rank in self.monitor.ranks:
            engine, current = str(rank), self.monitor.state(rank)
            for state in (*ENGINE_STATES, "unknown"):
                self.state.labels(engine, state).set(1 if state == current else 0)
            beat = self.monitor.stats(rank)
            if beat is not None:
                self.running.labels(engine).set(beat.stats.num_running)
                self.waiting.labels(engine).set(beat.stats.num_waiting)
                self.kv_usage.labels(engine).set(beat.stats.kv_cache_usage)
        return bytes(generate_latest(self.registry))


def build_monitor_app(monitor: EngineMonitor) -> FastAPI:
    """The headless host's HTTP app: /health, /ping, /ready and /metrics."""
    app = FastAPI(title="kubellm headless engines", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = MonitorMetrics(monitor)

    async def health(_request: Request) -> Response:
        problems = monitor.problems(draining_ok=True)
        if problems:
            return _unavailable("Engines not healthy: " + "; ".join(problems))
        return Response(status_code=200)

    async def ready(_request: Request) -> Response:
        if monitor.stopping:
            return _unavailable("The engines are shutting down.")
        problems = monitor.problems()
        if problems:
            return _unavailable("Engines not ready: " + "; ".join(problems))
        return Response(status_code=200)

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ping", health, methods=["GET", "POST"], include_in_schema=False)
    app.add_api_route("/ready", ready, methods=["GET"], include_in_schema=False)

    async def prometheus(_request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    return app


def _unavailable(message: str) -> Response:
    return error_response(message, status=503, type="ServiceUnavailableError")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has finished."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

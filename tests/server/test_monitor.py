"""The headless host's engine monitor: fed through a real PUSH socket, probed over ASGI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from kubellm.protocol.codec import encode
from kubellm.protocol.messages import EngineStatus, Heartbeat, SchedulerStats
from kubellm.server.monitor import EngineMonitor, build_monitor_app, cancel_and_wait

INCARNATION = 0x1234


def status(rank: int, state: Any, detail: str = "", incarnation: int = INCARNATION) -> EngineStatus:
    return EngineStatus(
        engine_index=rank, incarnation=incarnation, state=state, detail=detail, timestamp=1.0
    )


def beat(rank: int, running: int = 0, waiting: int = 0, kv: float = 0.0) -> Heartbeat:
    stats = SchedulerStats(num_running=running, num_waiting=waiting, kv_cache_usage=kv)
    return Heartbeat(
        engine_index=rank,
        incarnation=INCARNATION,
        timestamp=time.time(),
        seconds_since_progress=0.0,
        stats=stats,
    )


@pytest.fixture
def address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/monitor"


@pytest.fixture
async def monitor(address: str) -> AsyncIterator[EngineMonitor]:
    monitor = EngineMonitor(ranks=(2, 3), heartbeat_timeout_s=30.0)
    monitor.bind(address)
    task = asyncio.create_task(monitor.run())
    try:
        yield monitor
    finally:
        await cancel_and_wait(task)
        monitor.close()


@pytest.fixture
def push(address: str) -> Iterator[Callable[[Any], None]]:
    """Send a message (or raw bytes) the way an engine does: a PUSH connected to the monitor."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(address)

    def send(msg: Any) -> None:
        sock.send(msg if isinstance(msg, bytes) else encode(msg))

    try:
        yield send
    finally:
        sock.close(linger=0)
        ctx.term()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def client_for(monitor: EngineMonitor) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_monitor_app(monitor))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_probes_follow_the_engines_states(
    monitor: EngineMonitor, push: Callable[[Any], None]
) -> None:
    async with client_for(monitor) as http:
        first = await http.get("/health")
        assert first.status_code == 503
        message = first.json()["error"]["message"]
        assert "engine 2: no status yet" in message and "engine 3: no status yet" in message
        push(status(2, "registering"))
        push(status(3, "loading"))
        await until(lambda: monitor.state(3) == "loading")
        message = (await http.get("/ready")).json()["error"]["message"]
        assert "engine 2: registering" in message and "engine 3: loading" in message
        for rank in (2, 3):
            push(status(rank, "ready"))
            push(beat(rank))
        await until(lambda: not monitor.problems())
        for path in ("/health", "/ready", "/ping"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.post("/ping")).status_code == 200
        push(status(3, "failed", "the head at tcp://10.0.0.1:29550 is gone"))
        await until(lambda: monitor.state(3) == "failed")
        failed = await http.get("/health")
        assert failed.status_code == 503
        assert failed.json()["error"]["type"] == "ServiceUnavailableError"
        assert (
            "engine 3: failed (the head at tcp://10.0.0.1:29550 is gone)"
            in (failed.json()["error"]["message"])
        )
        assert "engine 2" not in failed.json()["error"]["message"]
        assert monitor.last_detail(3) == "the head at tcp://10.0.0.1:29550 is gone"


async def test_bad_frames_and_foreign_ranks_are_dropped(
    monitor: EngineMonitor, push: Callable[[Any], None]
) -> None:
    push(b"\x93not a message")
    push(status(7, "ready"))  # not a rank of this host
    push(status(2, "loading"))
    await until(lambda: monitor.state(2) == "loading")
    assert monitor.state(3) == "unknown"


def test_a_silent_ready_engine_is_not_healthy() -> None:
    monitor = EngineMonitor(ranks=(0,), heartbeat_timeout_s=5.0)
    monitor.feed(status(0, "ready"))
    assert monitor.problems(now=0.0) == ["engine 0: ready but no heartbeat yet"]
    monitor.feed(beat(0), now=100.0)
    assert monitor.problems(now=104.0) == []
    assert monitor.problems(now=106.0) == ["engine 0: no heartbeat for 6.0 s"]
    monitor.feed(status(0, "ready", incarnation=99))  # a restarted engine, no beat from it yet
    assert monitor.problems(now=101.0) == ["engine 0: heartbeats come from another incarnation"]


async def test_metrics_report_state_and_load_per_engine(
    monitor: EngineMonitor, push: Callable[[Any], None]
) -> None:
    push(status(2, "ready"))
    push(beat(2, running=3, waiting=5, kv=0.25))
    push(status(3, "loading"))
    await until(lambda: monitor.stats(2) is not None and monitor.state(3) == "loading")
    async with client_for(monitor) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'kubellm:engine_state{engine="2",state="ready"} 1.0' in text
    assert 'kubellm:engine_state{engine="2",state="loading"} 0.0' in text
    assert 'kubellm:engine_state{engine="3",state="loading"} 1.0' in text
    assert 'vllm:num_requests_running{engine="2"} 3.0' in text
    assert 'vllm:num_requests_waiting{engine="2"} 5.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="2"} 0.25' in text
    assert 'vllm:num_requests_running{engine="3"}' not in text  # no heartbeat from it yet


async def test_stopping_fails_readiness_but_not_liveness(monitor: EngineMonitor) -> None:
    for rank in (2, 3):
        monitor.feed(status(rank, "ready"))
        monitor.feed(beat(rank))
    async with client_for(monitor) as http:
        assert (await http.get("/ready")).status_code == 200
        monitor.stopping = True
        stopping = await http.get("/ready")
        assert (await http.get("/health")).status_code == 200  # until the engines exit
    assert stopping.status_code == 503
    assert stopping.json()["error"]["message"] == "The engines are shutting down."


async def test_a_draining_engine_is_live_but_not_ready(monitor: EngineMonitor) -> None:
    for rank in (2, 3):
        monitor.feed(status(rank, "ready"))
        monitor.feed(beat(rank))
    monitor.feed(status(3, "draining", "SIGTERM: up to 30 s"))
    async with client_for(monitor) as http:
        ready = await http.get("/ready")
        assert [(await http.get(p)).status_code for p in ("/health", "/ping")] == [200, 200]
        monitor.feed(status(3, "stopped", "stopped (SIGTERM, drained)"))
        health = await http.get("/health")
    assert ready.status_code == 503
    assert "engine 3: draining (SIGTERM: up to 30 s)" in ready.json()["error"]["message"]
    assert "engine 2" not in ready.json()["error"]["message"]
    assert health.status_code == 503
    assert "engine 3: stopped" in health.json()["error"]["message"]

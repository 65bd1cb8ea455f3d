"""EngineClient against a real `kubellm-engine` process running the dummy backend."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from kubellm.engine.dummy import dummy_token
from kubellm.protocol.messages import RequestOutput, SamplingParams, SchedulerStats
from kubellm.protocol.settings import EngineSettings, FrontendSettings, ServeSettings
from kubellm.server.engine_client import EngineClient
from kubellm.server.errors import EngineDeadError, EngineGenerateError, EngineStartupError
from kubellm.server.stats import RequestStats

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class RecordingSink:
    def __init__(self) -> None:
        self.engine_stats: list[SchedulerStats] = []
        self.requests: list[RequestStats] = []

    def record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None:
        self.engine_stats.append(stats)

    def record_request(self, stats: RequestStats) -> None:
        self.requests.append(stats)


def _settings(
    behaviour: str = "", engine: dict[str, Any] | None = None, **frontend: Any
) -> ServeSettings:
    return ServeSettings(
        engine=EngineSettings.model_validate(
            {"engine_backend": "dummy", "dummy_behaviour": behaviour, "heartbeat_interval_s": 0.2}
            | (engine or {})
        ),
        frontend=FrontendSettings.model_validate(
            {
                "engine_ready_timeout_s": 30,
                "engine_heartbeat_timeout_s": 5,
                "engine_progress_timeout_s": 10,
            }
            | frontend
        ),
    )


async def _collect(
    client: EngineClient, rid: str, prompt: list[int], **sampling: Any
) -> list[RequestOutput]:
    params = SamplingParams(**{"max_tokens": 8} | sampling)
    return [o async for o in client.generate(rid, prompt, params, time.time())]


async def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def client(
    request: pytest.FixtureRequest, sink: RecordingSink
) -> AsyncIterator[EngineClient]:
    """A started client; parametrise with indirect=True to pass _settings(...) kwargs."""
    kwargs = getattr(request, "param", {})
    async with EngineClient.start(_settings(**kwargs), sink) as c:
        try:
            yield c
        finally:
            pid = c.facts.pid
            if not _exited(pid):  # a test may have stopped it
                os.kill(pid, signal.SIGCONT)
    assert _exited(pid), "engine process left behind"


async def test_handshake_facts_and_utilities(client: EngineClient) -> None:
    facts = client.facts
    assert (facts.model, facts.max_model_len, facts.supported_tasks) == (
        "dummy",
        2048,
        ("generate",),
    )
    assert facts.pid != os.getpid() and not _exited(facts.pid)
    assert await client.call_utility("get_supported_tasks") == ["generate"]
    assert await client.call_utility("ping") == "pong"
    with pytest.raises(EngineGenerateError, match="no_such_method"):
        await client.call_utility("no_such_method")
    await client.check_health()
    assert not client.errored and client.dead_error is None


async def test_generate_streams_tokens_and_records_stats(
    client: EngineClient, sink: RecordingSink
) -> None:
    prompt = [11, 12, 13]
    outs = await _collect(client, "r1", prompt, max_tokens=5, logprobs=1)
    assert _tokens(outs) == [dummy_token(prompt, len(prompt) + i) for i in range(5)]
    assert outs[-1].finish_reason == "length"
    assert all(o.new_logprobs is not None for o in outs)
    (stats,) = sink.requests
    assert (stats.num_prompt_tokens, stats.num_generation_tokens, stats.finish_reason) == (
        3,
        5,
        "length",
    )
    assert stats.first_token_time is not None and stats.finish_time is not None
    assert stats.arrival_time <= stats.first_token_time <= stats.finish_time
    assert len(stats.inter_token_latencies) == 4 and stats.max_tokens_param == 5
    await _eventually(lambda: bool(sink.engine_stats), 5, "engine stats")
    assert client.num_in_flight == 0


@pytest.mark.parametrize("client", [{"engine": {"max_num_seqs": 8}}], indirect=True)
async def test_many_concurrent_requests(client: EngineClient, sink: RecordingSink) -> None:
    results = await asyncio.gather(
        *(_collect(client, f"r{i}", [i], max_tokens=20) for i in range(100))
    )
    for i, outs in enumerate(results):
        assert _tokens(outs) == [dummy_token([i], 1 + k) for k in range(20)]
    assert len(sink.requests) == 100 and client.num_in_flight == 0


@pytest.mark.parametrize("client", [{"behaviour": "token_delay_s=0.01"}], indirect=True)
async def test_cancelling_the_consumer_aborts_in_the_engine(
    client: EngineClient, sink: RecordingSink
) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in client.generate("long", [1], SamplingParams(max_tokens=1500), time.time()):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    stats = await client.call_utility("get_stats")
    assert isinstance(stats, dict) and stats["num_running"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def running() -> float:
        result = await client.call_utility("get_stats")
        assert isinstance(result, dict)
        return result["num_running"]

    deadline = time.monotonic() + 10
    while await running() != 0:
        assert time.monotonic() < deadline, "the engine kept running the cancelled request"
        await asyncio.sleep(0.05)
    assert [s.finish_reason for s in sink.requests] == ["abort"]
    assert client.num_in_flight == 0 and not client.errored


@pytest.mark.parametrize("client", [{"behaviour": "fail_prefix=bad-"}], indirect=True)
async def test_failed_request_leaves_the_client_healthy(
    client: EngineClient, sink: RecordingSink
) -> None:
    with pytest.raises(EngineGenerateError, match="bad-"):
        await _collect(client, "bad-1", [1])
    assert not client.errored
    await client.check_health()
    assert len(await _collect(client, "good-1", [1], max_tokens=3)) == 3
    assert [s.finish_reason for s in sink.requests] == ["error", "length"]


async def test_prompt_too_long_is_a_request_error(client: EngineClient) -> None:
    with pytest.raises(EngineGenerateError, match="max_model_len"):
        await _collect(client, "long", list(range(3000)))
    assert not client.errored


async def _dead_in_flight(
    client: EngineClient, kill: Callable[[], None], n: int = 3
) -> list[BaseException]:
    """Start n requests, wait for tokens on each, `kill`, and return what each raised."""
    seen = [asyncio.Event() for _ in range(n)]

    async def consume(i: int) -> None:
        async for _ in client.generate(f"r{i}", [i], SamplingParams(max_tokens=1500), time.time()):
            seen[i].set()

    tasks = [asyncio.create_task(consume(i)) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seen)), 10)
    kill()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    return [r for r in results if isinstance(r, BaseException)]


@pytest.mark.parametrize("client", [{"behaviour": "token_delay_s=0.01"}], indirect=True)
async def test_sigkill_of_the_engine_fails_in_flight_requests(
    client: EngineClient, sink: RecordingSink
) -> None:
    errors = await _dead_in_flight(client, lambda: os.kill(client.facts.pid, signal.SIGKILL))
    assert len(errors) == 3 and all(isinstance(e, EngineDeadError) for e in errors)
    assert [s.finish_reason for s in sink.requests] == ["error"] * 3
    assert client.errored and "exited with code -9" in str(client.dead_error)
    with pytest.raises(EngineDeadError):
        await client.check_health()
    with pytest.raises(EngineDeadError):
        await _collect(client, "after", [1])
    with pytest.raises(EngineDeadError):
        await client.call_utility("ping")


@pytest.mark.parametrize(
    "client", [{"behaviour": "token_delay_s=0.01,raise_after_tokens=20"}], indirect=True
)
async def test_engine_dead_message_is_fatal(client: EngineClient) -> None:
    errors = await _dead_in_flight(client, lambda: None, n=2)
    assert len(errors) == 2 and all(isinstance(e, EngineDeadError) for e in errors)
    assert "raise_after_tokens" in str(client.dead_error)


@pytest.mark.parametrize(
    "client",
    [{"behaviour": "token_delay_s=0.01", "engine_heartbeat_timeout_s": 2}],
    indirect=True,
)
async def test_stopped_engine_is_dead_after_the_heartbeat_timeout(client: EngineClient) -> None:
    pid = client.facts.pid
    try:
        errors = await _dead_in_flight(client, lambda: os.kill(pid, signal.SIGSTOP), n=1)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError)
    assert "no heartbeat" in str(client.dead_error)


@pytest.mark.parametrize(
    "client",
    [{"behaviour": "hang_after_tokens=3", "engine_progress_timeout_s": 1.5}],
    indirect=True,
)
async def test_hung_step_is_dead_after_the_progress_timeout(client: EngineClient) -> None:
    errors = await _dead_in_flight(client, lambda: None, n=1)
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError)
    assert "no progress" in str(client.dead_error)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (_settings("startup_fail=1"), "exited with code 1 during start-up.*startup_fail"),
        (
            _settings(engine={"engine_backend": "model", "model": "/nonexistent/model"}),
            "exited with code 1 during start-up.*does not exist",
        ),
        (_settings("startup_delay_s=60", engine_ready_timeout_s=1.0), "not ready within 1 s"),
    ],
)
async def test_startup_failures_raise_quickly(
    settings: ServeSettings, match: str, sink: RecordingSink
) -> None:
    before = {p.pid for p in psutil.Process().children()}
    started = time.monotonic()
    with pytest.raises(EngineStartupError, match=match):
        async with EngineClient.start(settings, sink):
            pytest.fail("the engine should not start")
    assert time.monotonic() - started < 20  # generous bound; typically about a second
    leftovers = [
        p for p in psutil.Process().children() if p.pid not in before and p.status() != "zombie"
    ]
    assert leftovers == []


async def test_shutdown_stops_the_engine_and_cleans_up(sink: RecordingSink) -> None:
    async with EngineClient.start(_settings(), sink) as client:
        proc = psutil.Process(client.facts.pid)
        tmpdir = client._tmpdir
        assert tmpdir is not None and os.path.isdir(tmpdir)
        await client.shutdown()
        assert _exited(proc.pid)
        assert not os.path.exists(tmpdir)
        with pytest.raises(EngineDeadError, match="shut down"):
            await _collect(client, "late", [1])
    await client.shutdown()  # a second call is harmless
    assert client._proc is not None and client._proc.returncode == 0  # SIGTERM: clean exit

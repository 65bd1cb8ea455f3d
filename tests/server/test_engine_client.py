"""EngineClient: against fake engines made of raw ZeroMQ sockets in the test (both ends under
control: balancing, eviction, disconnects, incarnations), and through `start_head` against real
`kubellm-engine` processes running the dummy backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq
import zmq.asyncio

from kubellm.engine.dummy import dummy_token
from kubellm.engine.transport import (
    create_curve_keys,
    curve_client,
    engine_identity,
    tcp_address,
)
from kubellm.protocol.codec import client_to_engine_decoder, encode
from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    ClientAddress,
    ClientToEngine,
    DrainingAck,
    EngineCompat,
    EngineDead,
    EngineDraining,
    EngineEvicted,
    EngineFacts,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import (
    EngineSettings,
    FrontendSettings,
    ParallelSettings,
    ServeSettings,
)
from kubellm.server.engine_client import EngineClient
from kubellm.server.errors import (
    EngineDeadError,
    EngineGenerateError,
    EngineStartupError,
    EngineUnavailableError,
)
from kubellm.server.head import start_head
from kubellm.server.stats import RequestStats

pytestmark = pytest.mark.timeout(90)

COMPAT = EngineCompat(
    protocol_version=PROTOCOL_VERSION,
    revision="kubellm test",
    model_digest="0123456789abcdef",
    max_model_len=None,
    dtype="auto",
    engine_backend="dummy",
)


class RecordingSink:
    def __init__(self) -> None:
        self.engine_stats: list[tuple[int, SchedulerStats]] = []
        self.requests: list[RequestStats] = []

    def record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None:
        self.engine_stats.append((engine_index, stats))

    def record_request(self, stats: RequestStats) -> None:
        self.requests.append(stats)


async def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


async def _collect(
    client: EngineClient, rid: str, prompt: list[int], **sampling: Any
) -> list[RequestOutput]:
    params = SamplingParams(**{"max_tokens": 8} | sampling)
    return [o async for o in client.generate(rid, prompt, params, time.time())]


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


# -- fake engines -----------------------------------------------------------------------------


class FakeEngine:
    """An engine core's client-side sockets, driven by the test."""

    def __init__(
        self,
        address: ClientAddress,
        rank: int,
        *,
        incarnation: int | None = None,
        curve_dir: Path | None = None,
    ):
        self.rank = rank
        self.incarnation = incarnation if incarnation is not None else random.getrandbits(63)
        self.ctx = zmq.asyncio.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.push = self.ctx.socket(zmq.PUSH)
        self.dealer.setsockopt(zmq.IDENTITY, engine_identity(rank, self.incarnation))
        for sock in (self.dealer, self.push):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, 1)
            if curve_dir is not None:
                curve_client(sock, str(curve_dir))
        self.dealer.connect(address.input)
        self.push.connect(address.output)
        self.decoder = client_to_engine_decoder()
        self.closed = False

    def facts(self, **overrides: Any) -> EngineFacts:
        values: dict[str, Any] = {
            "engine_index": self.rank,
            "incarnation": self.incarnation,
            "compat": COMPAT,
            "model": "fake",
            "max_model_len": 128,
            "supported_tasks": ("generate",),
            "num_kv_blocks": 64,
            "block_size": 16,
            "max_num_seqs": 8,
            "vocab_size": 100,
            "eos_token_ids": (2,),
            "device": "cpu",
            "dtype": "float32",
            "pid": 4000 + self.rank,
            "host": f"pod-{self.rank}",
        }
        return EngineFacts(**values | overrides)

    async def ready(self, **overrides: Any) -> None:
        await self.dealer.send(encode(EngineReady(facts=self.facts(**overrides))))

    async def recv(self, timeout: float = 5.0) -> ClientToEngine:
        """The next message from the client, skipping connection probes (empty aborts)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.dealer.poll(int(remaining * 1000) + 1):
                raise TimeoutError(f"fake engine {self.rank} received nothing")
            msg = self.decoder.decode(await self.dealer.recv())
            if not (isinstance(msg, AbortRequests) and not msg.request_ids):
                return msg

    async def recv_nothing(self, timeout: float = 0.2) -> bool:
        with contextlib.suppress(TimeoutError):
            await self.recv(timeout)
            return False
        return True

    async def send(self, msg: Any) -> None:
        await self.push.send(encode(msg))

    async def outputs(self, *outs: RequestOutput, stats: SchedulerStats | None = None) -> None:
        await self.send(
            EngineOutputs(
                engine_index=self.rank,
                incarnation=self.incarnation,
                outputs=outs,
                timestamp=time.time(),
                stats=stats,
            )
        )

    async def beat(self, stats: SchedulerStats | None = None, progress: float = 0.0) -> None:
        await self.send(
            Heartbeat(
                engine_index=self.rank,
                incarnation=self.incarnation,
                timestamp=time.time(),
                seconds_since_progress=progress,
                stats=stats or SchedulerStats(),
            )
        )

    async def dead(self, reason: str, clean: bool = False) -> None:
        await self.send(
            EngineDead(
                engine_index=self.rank, incarnation=self.incarnation, reason=reason, clean=clean
            )
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.dealer.close(linger=0)
            self.push.close(linger=0)
            self.ctx.term()


class FakeLocal:
    """Stands in for LocalEngines: the test sets exit codes."""

    def __init__(self, *ranks: int):
        self.ranks = ranks
        self.codes: dict[int, int] = {}

    def exited(self) -> dict[int, int]:
        return dict(self.codes)


@pytest.fixture
def address() -> Iterator[ClientAddress]:
    tmpdir = tempfile.mkdtemp(prefix="kl-")  # short: ipc paths are limited to ~100 bytes
    yield ClientAddress(input=f"ipc://{tmpdir}/in", output=f"ipc://{tmpdir}/out")
    shutil.rmtree(tmpdir, ignore_errors=True)


def _fake_settings(
    size: int = 2, *, curve_dir: Path | None = None, **frontend: Any
) -> ServeSettings:
    return ServeSettings(
        engine=EngineSettings(engine_backend="dummy"),
        frontend=FrontendSettings.model_validate({"engine_heartbeat_timeout_s": 5} | frontend),
        parallel=ParallelSettings(
            data_parallel_size=size,
            data_parallel_size_local=0,
            zmq_curve_dir=str(curve_dir) if curve_dir else None,
        ),
    )


@contextlib.asynccontextmanager
async def _client(
    address: ClientAddress,
    sink: RecordingSink,
    settings: ServeSettings | None = None,
    local: FakeLocal | None = None,
) -> AsyncIterator[EngineClient]:
    client = EngineClient(
        settings or _fake_settings(), sink, address=address, compat=COMPAT, local=local
    )
    async with client:
        yield client


@pytest.fixture
async def fakes(address: ClientAddress) -> AsyncIterator[Callable[..., FakeEngine]]:
    made: list[FakeEngine] = []

    def make(rank: int, **kwargs: Any) -> FakeEngine:
        made.append(FakeEngine(address, rank, **kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@pytest.fixture
async def two(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> AsyncIterator[tuple[EngineClient, FakeEngine, FakeEngine]]:
    """A client with two ready fake engines, ranks 0 and 1."""
    async with _client(address, sink) as client:
        engines = fakes(0), fakes(1)
        for fake in engines:
            await fake.ready()
        await client.wait_for_engines([0, 1], 5)
        yield client, *engines


async def _start(
    client: EngineClient, fake: FakeEngine, rid: str
) -> asyncio.Task[list[RequestOutput]]:
    """Start request `rid` and check that `fake` received it."""
    task = asyncio.create_task(_collect(client, rid, [1, 2]))
    msg = await fake.recv()
    assert isinstance(msg, AddRequest) and msg.request_id == rid
    return task


def _done(rid: str, *tokens: int) -> RequestOutput:
    return RequestOutput(request_id=rid, new_token_ids=tokens, finish_reason="length")


async def test_without_engines_requests_are_unavailable(
    address: ClientAddress, sink: RecordingSink
) -> None:
    async with _client(address, sink) as client:
        assert (client.num_ready, client.ready, client.engines()) == (0, False, [])
        with pytest.raises(EngineUnavailableError, match="no engine is ready"):
            await _collect(client, "r1", [1])
        with pytest.raises(EngineUnavailableError):
            await client.call_utility("ping")
        with pytest.raises(EngineUnavailableError):
            _ = client.facts
        await client.check_health()  # not fatal: remote engines may still come
        assert client.num_in_flight == 0 and sink.requests == []
        with pytest.raises(EngineStartupError, match=r"engines 0, 1 were not ready within 0\.2 s"):
            await client.wait_for_engines([1, 0], 0.2)


async def test_handshake_makes_a_slot_per_rank(
    two: tuple[EngineClient, FakeEngine, FakeEngine],
) -> None:
    client, f0, f1 = two
    assert client.ready and client.num_ready == 2
    assert (client.facts.engine_index, client.facts.host) == (0, "pod-0")
    views = client.engines()
    assert [(v.rank, v.incarnation, v.host, v.pid, v.state) for v in views] == [
        (0, f0.incarnation, "pod-0", 4000, "ready"),
        (1, f1.incarnation, "pod-1", 4001, "ready"),
    ]
    await f0.ready()  # a repeated handshake changes nothing
    await asyncio.sleep(0.1)
    assert [v.incarnation for v in client.engines()] == [f0.incarnation, f1.incarnation]


async def test_a_request_streams_from_its_engine_and_records_stats(
    two: tuple[EngineClient, FakeEngine, FakeEngine], sink: RecordingSink
) -> None:
    client, f0, f1 = two
    task = await _start(client, f0, "r1")
    running = SchedulerStats(num_running=1, kv_cache_usage=0.25)
    await f0.outputs(RequestOutput(request_id="r1", new_token_ids=(7,)), stats=running)
    await f1.outputs(RequestOutput(request_id="r1", new_token_ids=(666,)))  # not its engine
    await f0.outputs(_done("r1", 8))
    assert _tokens(await task) == [7, 8]
    assert [(s.num_generation_tokens, s.finish_reason) for s in sink.requests] == [(2, "length")]
    assert sink.engine_stats == [(0, running)]
    await f1.beat(SchedulerStats(num_waiting=2))
    await _eventually(lambda: len(sink.engine_stats) == 2, 5, "engine 1 stats")
    assert sink.engine_stats[1][0] == 1 and client.engines()[1].stats.num_waiting == 2
    assert client.num_in_flight == 0


async def test_requests_go_to_the_less_loaded_engine(
    two: tuple[EngineClient, FakeEngine, FakeEngine],
) -> None:
    client, f0, f1 = two
    # Idle engines take turns, client 0 starting at engine 0.
    t1 = await _start(client, f0, "r1")
    t2 = await _start(client, f1, "r2")
    # Engine 1 reports a queue: new work goes to engine 0 although it has one request.
    await f1.beat(SchedulerStats(num_running=1, num_waiting=1))
    await f0.beat(SchedulerStats(num_running=1))
    await _eventually(lambda: client.engines()[1].stats.num_waiting == 1, 5, "stats")
    t3 = await _start(client, f0, "r3")
    t4 = await _start(client, f0, "r4")
    assert await f1.recv_nothing()
    assert [v.in_flight for v in client.engines()] == [3, 1]
    for fake, rid in ((f0, "r1"), (f1, "r2"), (f0, "r3"), (f0, "r4")):
        await fake.outputs(_done(rid, 5))
    assert [len(await t) for t in (t1, t2, t3, t4)] == [1, 1, 1, 1]


async def test_abort_and_utilities_are_routed_to_each_request_s_engine(
    two: tuple[EngineClient, FakeEngine, FakeEngine],
) -> None:
    client, f0, f1 = two
    t1, t2 = await _start(client, f0, "r1"), await _start(client, f1, "r2")
    await client.abort(["r2", "r1", "unknown"])
    assert await f0.recv() == AbortRequests(request_ids=("r1",))
    assert await f1.recv() == AbortRequests(request_ids=("r2",))

    call = asyncio.create_task(client.call_utility("get_stats", engine_index=1))
    msg = await f1.recv()
    assert isinstance(msg, UtilityRequest) and msg.method == "get_stats"
    await f1.send(UtilityResult(call_id=msg.call_id, engine_index=1, result={"num_running": 1}))
    assert await call == {"num_running": 1}
    with pytest.raises(EngineUnavailableError, match="engine 5 is not ready"):
        await client.call_utility("ping", engine_index=5)

    # Cancelling a consumer aborts its request on its own engine.
    t1.cancel()
    assert await f0.recv() == AbortRequests(request_ids=("r1",))
    await f1.outputs(RequestOutput(request_id="r2", new_token_ids=(), finish_reason="abort"))
    assert (await t2)[-1].finish_reason == "abort"
    assert client.num_in_flight == 0


async def test_a_draining_engine_finishes_its_requests_and_gets_no_new_ones(
    two: tuple[EngineClient, FakeEngine, FakeEngine], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubellm.server.engine_client")
    client, f0, f1 = two
    await f1.beat(SchedulerStats(num_running=5, num_waiting=5))
    await _eventually(lambda: client.engines()[1].stats.num_running == 5, 5, "stats")
    t1, t2 = await _start(client, f0, "r1"), await _start(client, f0, "r2")
    await f0.send(EngineDraining(engine_index=0, incarnation=f0.incarnation, deadline_s=30.0))
    assert await f0.recv() == DrainingAck(client_index=0)
    assert (client.num_ready, client.ready) == (1, False)
    assert [v.state for v in client.engines()] == ["draining", "ready"]
    assert "engine 0 draining (deadline 30 s)" in caplog.text
    # New work goes to engine 1 only, however loaded it is; utilities too.
    news = [await _start(client, f1, f"new{i}") for i in range(3)]
    assert await f0.recv_nothing()
    call = asyncio.create_task(client.call_utility("ping"))
    assert isinstance(await f1.recv(), UtilityRequest)
    call.cancel()
    # Its own requests go on: one finishes, the other is still there when it says goodbye.
    await f0.outputs(RequestOutput(request_id="r1", new_token_ids=(7,)))
    await f0.outputs(_done("r1", 8))
    assert _tokens(await t1) == [7, 8]
    await f0.dead("stopped (SIGTERM, drained)", clean=True)
    with pytest.raises(EngineDeadError, match="engine 0 died: it stopped"):
        await t2
    assert [v.state for v in client.engines()] == ["dead", "ready"]
    for i, task in enumerate(news):
        await f1.outputs(_done(f"new{i}", 1))
        assert _tokens(await task) == [1]
    assert client.num_in_flight == 0 and not client.errored
    dead = [r for r in caplog.records if "is dead" in r.message]
    assert len(dead) == 1 and "failing 1 request(s)" in dead[0].message


async def test_one_engine_dies_the_other_serves_and_a_new_incarnation_rejoins(
    two: tuple[EngineClient, FakeEngine, FakeEngine], fakes: Callable[..., FakeEngine]
) -> None:
    client, f0, f1 = two
    t1, t2 = await _start(client, f0, "r1"), await _start(client, f1, "r2")
    call = asyncio.create_task(client.call_utility("ping", engine_index=0))
    assert isinstance(await f0.recv(), UtilityRequest)
    await f0.dead("CUDA error: an illegal memory access")
    with pytest.raises(EngineDeadError, match=r"engine 0 died: .*illegal memory access"):
        await t1
    with pytest.raises(EngineDeadError, match="engine 0 died"):
        await call
    assert not client.errored and client.num_ready == 1 and not client.ready
    view = client.engines()[0]
    assert view.state == "dead" and "illegal memory access" in (view.dead_reason or "")
    with pytest.raises(EngineDeadError, match="engine 0 died"):
        await client.call_utility("ping", engine_index=0)

    # The survivor finishes its request and gets all new work.
    await f1.outputs(_done("r2", 9))
    assert _tokens(await t2) == [9]
    t3 = await _start(client, f1, "r3")
    assert client.facts.engine_index == 1

    # The dead incarnation is told to go when it speaks again.
    await f0.beat()
    evicted = await f0.recv()
    assert isinstance(evicted, EngineEvicted) and "illegal memory access" in evicted.reason

    # A new incarnation of rank 0 rejoins and, being idle, gets the next request.
    f0b = fakes(0)
    await f0b.ready()
    await client.wait_for_engines([0], 5)
    assert client.ready and client.engines()[0].incarnation == f0b.incarnation
    t4 = await _start(client, f0b, "r4")
    await f0b.outputs(_done("r4", 1))
    await f1.outputs(_done("r3", 1))
    assert [len(await t) for t in (t3, t4)] == [1, 1]


async def test_a_new_incarnation_replaces_the_old_one(
    two: tuple[EngineClient, FakeEngine, FakeEngine], fakes: Callable[..., FakeEngine]
) -> None:
    client, f0, _ = two
    task = await _start(client, f0, "r1")
    f0b = fakes(0)
    await f0b.ready()
    with pytest.raises(EngineDeadError, match="replaced by its new incarnation"):
        await task
    await _eventually(
        lambda: client.engines()[0].incarnation == f0b.incarnation, 5, "the new incarnation"
    )
    assert client.num_ready == 2
    await f0.outputs(_done("r1"))  # the old one speaks: evicted
    assert isinstance(await f0.recv(), EngineEvicted)


async def test_a_closed_connection_kills_only_that_slot(
    two: tuple[EngineClient, FakeEngine, FakeEngine],
) -> None:
    client, f0, f1 = two
    task = await _start(client, f0, "r1")
    f0.close()
    with pytest.raises(EngineDeadError, match="connection to this API server closed"):
        await asyncio.wait_for(task, 10)
    assert [v.state for v in client.engines()] == ["dead", "ready"] and not client.errored
    await _start(client, f1, "r2")


async def test_a_mismatching_engine_is_evicted(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    async with _client(address, sink) as client:
        wrong = fakes(0)
        await wrong.ready(compat=msgspec.structs.replace(COMPAT, revision="kubellm test/other"))
        evicted = await wrong.recv()
        assert isinstance(evicted, EngineEvicted)
        assert "revision: head 'kubellm test', engine 'kubellm test/other'" in evicted.reason
        out_of_range = fakes(7)
        await out_of_range.ready()
        evicted = await out_of_range.recv()
        assert isinstance(evicted, EngineEvicted) and "rank 7 is outside 0..1" in evicted.reason
        assert client.num_ready == 0 and client.engines() == []
        await wrong.beat()  # still evicted, and never a slot
        assert isinstance(await wrong.recv(), EngineEvicted)
        assert client.num_ready == 0


async def test_heartbeat_and_progress_timeouts_are_per_engine(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    settings = _fake_settings(3, engine_heartbeat_timeout_s=1, engine_progress_timeout_s=2)
    async with _client(address, sink, settings) as client:
        silent, hung, fine = fakes(0), fakes(1), fakes(2)
        for fake in (silent, hung, fine):
            await fake.ready()
        await client.wait_for_engines([0, 1, 2], 5)
        task = await _start(client, silent, "r1")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # `silent` never beats
            await fine.beat()
            await hung.beat(progress=1.0)
            await asyncio.sleep(0.1)
        with pytest.raises(EngineDeadError, match="no heartbeat for 1 s"):
            await task
        await hung.beat(progress=2.5)
        await _eventually(lambda: client.num_ready == 1, 5, "the hung engine's death")
        assert "no progress for 2.5 s" in (client.engines()[1].dead_reason or "")
        assert [v.state for v in client.engines()] == ["dead", "dead", "ready"]
        assert not client.errored


async def test_bad_frames_are_dropped(
    two: tuple[EngineClient, FakeEngine, FakeEngine],
) -> None:
    client, f0, _ = two
    await f0.push.send(b"\x93not a message")
    await f0.dealer.send(b"\xc1")
    await f0.dealer.send_multipart([b"a", b"b"])
    await f0.send(
        Heartbeat(
            engine_index=70000,
            incarnation=1,
            timestamp=0.0,
            seconds_since_progress=0.0,
            stats=SchedulerStats(),
        )
    )
    task = await _start(client, f0, "r1")
    await f0.outputs(_done("r1", 3))
    assert _tokens(await task) == [3] and client.num_ready == 2


async def test_the_death_of_a_local_engine_is_fatal(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    local = FakeLocal(0)
    async with _client(address, sink, _fake_settings(), local) as client:
        f0, f1 = fakes(0), fakes(1)
        await f0.ready()
        await f1.ready()
        await client.wait_for_engines([0, 1], 5)
        t0, t1 = await _start(client, f0, "r0"), await _start(client, f1, "r1")
        local.codes[0] = -9
        with pytest.raises(EngineDeadError, match="exited with code -9"):
            await t0
        assert client.errored and "exited with code -9" in str(client.dead_error)
        with pytest.raises(EngineDeadError):
            await client.check_health()
        with pytest.raises(EngineDeadError):
            await _collect(client, "after", [1])
        assert not t1.done()  # engine 1 is fine; the process is going down, though
    with pytest.raises(EngineDeadError, match="shut down"):
        await t1


async def test_a_local_engine_whose_connection_closes_is_dead_soon_after(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    local = FakeLocal(0)
    async with _client(address, sink, _fake_settings(1), local) as client:
        f0 = fakes(0)
        await f0.ready()
        await client.wait_for_engines([0], 5)
        task = await _start(client, f0, "r1")
        f0.close()  # and no exit code shows up: the connection loss is the reason
        with pytest.raises(EngineDeadError, match="connection to this API server closed"):
            await asyncio.wait_for(task, 10)
        assert client.errored and "connection" in str(client.dead_error)


async def test_a_local_engine_that_exits_during_start_up_names_its_reason(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    local = FakeLocal(0, 1)
    async with _client(address, sink, _fake_settings(), local) as client:
        f1 = fakes(1)
        await f1.dead("cannot load the model: out of memory")
        local.codes[1] = 1
        with pytest.raises(
            EngineStartupError,
            match="engine 1 exited with code 1 during start-up: cannot load the model",
        ):
            await client.wait_for_engines([0, 1], 10)
        assert client.errored


async def test_curve_accepts_only_engines_with_the_engine_key(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine], tmp_path: Path
) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    create_curve_keys(keys)
    create_curve_keys(other)
    (other / "head.key").write_bytes((keys / "head.key").read_bytes())  # right head, wrong engine
    async with _client(address, sink, _fake_settings(curve_dir=keys)) as client:
        await fakes(0, curve_dir=keys).ready()
        await client.wait_for_engines([0], 5)
        await fakes(1, curve_dir=other).ready()
        with pytest.raises(EngineStartupError, match="engine 1 was not ready"):
            await client.wait_for_engines([1], 1)
        assert client.num_ready == 1


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _has_ipv6_loopback() -> bool:
    try:
        _free_port("::1")
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1", marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
        ),
    ],
)
async def test_tcp_links_and_their_disconnects(host: str, sink: RecordingSink) -> None:
    tcp = ClientAddress(
        input=tcp_address(host, _free_port(host)), output=tcp_address(host, _free_port(host))
    )
    async with _client(tcp, sink) as client:
        f0, f1 = FakeEngine(tcp, 0), FakeEngine(tcp, 1)
        try:
            await f0.ready()
            await f1.ready()
            await client.wait_for_engines([0, 1], 5)
            task = await _start(client, f0, "r1")
            f0.close()  # a SIGKILLed pod: its kernel closes the connection
            with pytest.raises(EngineDeadError, match="connection to this API server closed"):
                await asyncio.wait_for(task, 10)
            await _start(client, f1, "r2")
        finally:
            f0.close()
            f1.close()


async def test_shutdown_fails_pending_requests_and_is_idempotent(
    address: ClientAddress, sink: RecordingSink, fakes: Callable[..., FakeEngine]
) -> None:
    client = EngineClient(_fake_settings(1), sink, address=address, compat=COMPAT)
    await client.start()
    f0 = fakes(0)
    await f0.ready()
    await client.wait_for_engines([0], 5)
    task = await _start(client, f0, "r1")
    await client.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):
        await task
    with pytest.raises(EngineDeadError, match="shut down"):
        await _collect(client, "late", [1])
    assert not client.ready
    await client.shutdown()


# -- real engines through start_head ----------------------------------------------------------


def _settings(
    behaviour: str = "", engine: dict[str, Any] | None = None, size: int = 1, **frontend: Any
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
        parallel=ParallelSettings(data_parallel_size=size, api_server_count=1),
    )


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def head(request: pytest.FixtureRequest, sink: RecordingSink) -> AsyncIterator[EngineClient]:
    """start_head with real dummy engines; parametrise with indirect=True to pass _settings(...)
    kwargs. Checks that no engine process is left behind."""
    kwargs = getattr(request, "param", {})
    async with start_head(_settings(**kwargs), sink) as client:
        pids = [v.pid for v in client.engines()]
        try:
            yield client
        finally:
            for pid in pids:
                if not _exited(pid):  # a test may have stopped it
                    os.kill(pid, signal.SIGCONT)
    assert all(_exited(pid) for pid in pids), "engine process left behind"


@pytest.mark.integration
@pytest.mark.parametrize("head", [{"size": 2}], indirect=True)
async def test_head_handshake_facts_and_utilities(head: EngineClient) -> None:
    assert head.ready and head.num_ready == 2 and not head.errored
    facts = head.facts
    assert (facts.model, facts.max_model_len, facts.supported_tasks, facts.engine_index) == (
        "dummy",
        2048,
        ("generate",),
        0,
    )
    views = head.engines()
    assert [v.rank for v in views] == [0, 1] and len({v.pid for v in views}) == 2
    assert all(v.pid != os.getpid() and not _exited(v.pid) for v in views)
    assert await head.call_utility("get_supported_tasks") == ["generate"]
    assert await head.call_utility("ping", engine_index=1) == "pong"
    with pytest.raises(EngineGenerateError, match="no_such_method"):
        await head.call_utility("no_such_method")
    await head.check_health()


@pytest.mark.integration
async def test_head_streams_tokens_and_records_stats(
    head: EngineClient, sink: RecordingSink
) -> None:
    prompt = [11, 12, 13]
    outs = await _collect(head, "r1", prompt, max_tokens=5, logprobs=1)
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
    assert head.num_in_flight == 0


@pytest.mark.integration
@pytest.mark.parametrize("head", [{"engine": {"max_num_seqs": 8}, "size": 2}], indirect=True)
async def test_head_many_concurrent_requests_spread_over_engines(
    head: EngineClient, sink: RecordingSink
) -> None:
    results = await asyncio.gather(
        *(_collect(head, f"r{i}", [i], max_tokens=20) for i in range(100))
    )
    for i, outs in enumerate(results):
        assert _tokens(outs) == [dummy_token([i], 1 + k) for k in range(20)]
    assert len(sink.requests) == 100 and head.num_in_flight == 0
    steps = []
    for rank in (0, 1):
        stats = await head.call_utility("get_stats", engine_index=rank)
        assert isinstance(stats, dict)
        steps.append(stats["num_steps"])
    assert all(s > 0 for s in steps), f"an engine got no work: steps {steps}"


@pytest.mark.integration
@pytest.mark.parametrize("head", [{"behaviour": "token_delay_s=0.01"}], indirect=True)
async def test_head_cancelling_the_consumer_aborts_in_the_engine(
    head: EngineClient, sink: RecordingSink
) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in head.generate("long", [1], SamplingParams(max_tokens=1500), time.time()):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)

    async def running() -> float:
        result = await head.call_utility("get_stats")
        assert isinstance(result, dict)
        return result["num_running"]

    assert await running() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 10
    while await running() != 0:
        assert time.monotonic() < deadline, "the engine kept running the cancelled request"
        await asyncio.sleep(0.05)
    assert [s.finish_reason for s in sink.requests] == ["abort"]
    assert head.num_in_flight == 0 and not head.errored


@pytest.mark.integration
@pytest.mark.parametrize("head", [{"behaviour": "fail_prefix=bad-"}], indirect=True)
async def test_head_failed_request_leaves_the_client_healthy(
    head: EngineClient, sink: RecordingSink
) -> None:
    with pytest.raises(EngineGenerateError, match="bad-"):
        await _collect(head, "bad-1", [1])
    with pytest.raises(EngineGenerateError, match="max_model_len"):
        await _collect(head, "long", list(range(3000)))
    assert not head.errored
    await head.check_health()
    assert len(await _collect(head, "good-1", [1], max_tokens=3)) == 3
    assert [s.finish_reason for s in sink.requests] == ["error", "error", "length"]


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


@pytest.mark.integration
@pytest.mark.parametrize("head", [{"behaviour": "token_delay_s=0.01"}], indirect=True)
async def test_head_sigkill_of_a_local_engine_is_fatal(
    head: EngineClient, sink: RecordingSink
) -> None:
    errors = await _dead_in_flight(head, lambda: os.kill(head.facts.pid, signal.SIGKILL))
    assert len(errors) == 3 and all(isinstance(e, EngineDeadError) for e in errors)
    assert [s.finish_reason for s in sink.requests] == ["error"] * 3
    assert head.errored and "exited with code -9" in str(head.dead_error)
    assert head.engines()[0].state == "dead" and not head.ready
    with pytest.raises(EngineDeadError):
        await head.check_health()
    with pytest.raises(EngineDeadError):
        await _collect(head, "after", [1])
    with pytest.raises(EngineDeadError):
        await head.call_utility("ping")


@pytest.mark.integration
@pytest.mark.parametrize(
    "head", [{"behaviour": "token_delay_s=0.01,raise_after_tokens=20"}], indirect=True
)
async def test_head_engine_dead_message_is_fatal(head: EngineClient) -> None:
    errors = await _dead_in_flight(head, lambda: None, n=2)
    assert len(errors) == 2 and all(isinstance(e, EngineDeadError) for e in errors)
    assert "raise_after_tokens" in str(head.dead_error)


@pytest.mark.integration
@pytest.mark.parametrize(
    "head",
    [{"behaviour": "token_delay_s=0.01", "engine_heartbeat_timeout_s": 2}],
    indirect=True,
)
async def test_head_stopped_engine_is_dead_after_the_heartbeat_timeout(
    head: EngineClient,
) -> None:
    pid = head.facts.pid
    try:
        errors = await _dead_in_flight(head, lambda: os.kill(pid, signal.SIGSTOP), n=1)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError)
    assert "no heartbeat" in str(head.dead_error)


@pytest.mark.integration
@pytest.mark.parametrize(
    "head",
    [{"behaviour": "hang_after_tokens=3", "engine_progress_timeout_s": 1.5}],
    indirect=True,
)
async def test_head_hung_step_is_dead_after_the_progress_timeout(head: EngineClient) -> None:
    errors = await _dead_in_flight(head, lambda: None, n=1)
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError)
    assert "no progress" in str(head.dead_error)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            _settings("startup_fail=1"),
            "engine 0 exited with code 1 during start-up: .*dummy engine start-up failure",
        ),
        (
            _settings(engine={"engine_backend": "model", "model": "/nonexistent/model"}),
            "cannot serve this model: .*does not exist",
        ),
        (_settings("startup_delay_s=60", engine_ready_timeout_s=1.0), "not ready within 1 s"),
    ],
)
async def test_head_startup_failures_raise_quickly_and_leave_no_process(
    settings: ServeSettings, match: str, sink: RecordingSink
) -> None:
    before = {p.pid for p in psutil.Process().children()}
    started = time.monotonic()
    with pytest.raises(EngineStartupError, match=match):
        async with start_head(settings, sink):
            pytest.fail("the engine should not start")
    assert time.monotonic() - started < 20  # generous bound; typically about a second
    leftovers = [
        p for p in psutil.Process().children() if p.pid not in before and p.status() != "zombie"
    ]
    assert leftovers == []


@pytest.mark.integration
async def test_head_cancelled_during_start_up_leaves_no_process(sink: RecordingSink) -> None:
    before = {p.pid for p in psutil.Process().children()}

    async def start() -> None:
        async with start_head(_settings("startup_delay_s=60"), sink):
            pytest.fail("the engine should not start")

    task = asyncio.create_task(start())
    await _eventually(
        lambda: any(p.pid not in before for p in psutil.Process().children()), 10, "a spawn"
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    leftovers = [
        p for p in psutil.Process().children() if p.pid not in before and p.status() != "zombie"
    ]
    assert leftovers == []


@pytest.mark.integration
async def test_head_shutdown_stops_the_engines_and_cleans_up(sink: RecordingSink) -> None:
    async with start_head(_settings(size=2), sink) as client:
        procs = [psutil.Process(v.pid) for v in client.engines()]
        ipc_dir = os.path.dirname(client._address.input.removeprefix("ipc://"))
        assert os.path.isdir(ipc_dir)
    assert all(_exited(p.pid) for p in procs)
    assert not os.path.exists(ipc_dir)
    with pytest.raises(EngineDeadError, match="shut down"):
        await _collect(client, "late", [1])
    await client.shutdown()  # a second call is harmless

"""Coordinator against fake engines: raw DEALER sockets speaking the registration protocol."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from kubellm.engine.transport import create_curve_keys, curve_client, engine_identity
from kubellm.protocol.codec import coordinator_to_engine_decoder, encode
from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    CoordinatorToEngine,
    EngineCompat,
    EngineDead,
    EngineHello,
    EngineRefused,
    EngineWelcome,
    HeadBeat,
    Heartbeat,
    SchedulerStats,
)
from kubellm.protocol.settings import ParallelSettings
from kubellm.server.coordinator import Coordinator
from kubellm.server.head import HeadPlan

pytestmark = pytest.mark.timeout(60)

COMPAT = EngineCompat(
    protocol_version=PROTOCOL_VERSION,
    revision="kubellm test",
    model_digest="0123456789abcdef",
    max_model_len=None,
    dtype="auto",
    engine_backend="dummy",
)
_decoder = coordinator_to_engine_decoder()


class FakeEngine:
    """One engine's DEALER towards the coordinator."""

    def __init__(self, ctx: zmq.Context[Any], address: str, rank: int, incarnation: int):
        self.rank, self.incarnation = rank, incarnation
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, engine_identity(rank, incarnation))
        self.address = address

    def connect(self) -> FakeEngine:
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.connect(self.address)
        return self

    def hello(self, compat: EngineCompat = COMPAT) -> None:
        msg = EngineHello(
            engine_index=self.rank,
            incarnation=self.incarnation,
            compat=compat,
            pid=1000 + self.rank,
            host="fake-host",
        )
        self.sock.send(encode(msg))

    def heartbeat(self) -> None:
        beat = Heartbeat(
            engine_index=self.rank,
            incarnation=self.incarnation,
            timestamp=time.time(),
            seconds_since_progress=0.0,
            stats=SchedulerStats(),
        )
        self.sock.send(encode(beat))

    def recv(self, timeout: float = 5.0, skip_beats: bool = True) -> CoordinatorToEngine | None:
        """The next message (HeadBeats skipped unless asked), or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            msg = _decoder.decode(self.sock.recv())
            if not (skip_beats and isinstance(msg, HeadBeat)):
                return msg
        return None

    def register(self) -> EngineWelcome:
        self.hello()
        msg = self.recv()
        assert isinstance(msg, EngineWelcome), msg
        return msg


Engines = Callable[..., FakeEngine]


@pytest.fixture
def engines() -> Iterator[Engines]:
    """make(coordinator, rank, incarnation, curve_dir=None) → a connected FakeEngine."""
    ctx: zmq.Context[Any] = zmq.Context()
    made: list[FakeEngine] = []

    def make(
        c: Coordinator, rank: int, incarnation: int, curve_dir: str | None = None
    ) -> FakeEngine:
        engine = FakeEngine(ctx, c._plan.coordinator_connect, rank, incarnation)
        made.append(engine)
        if curve_dir is not None:
            curve_client(engine.sock, curve_dir)
        return engine.connect()

    yield make
    for engine in made:
        engine.sock.close(linger=0)
    ctx.term()


@pytest.fixture
def make_coordinator() -> Iterator[Callable[..., Coordinator]]:
    made: list[tuple[Coordinator, HeadPlan]] = []

    def make(size: int = 2, plan: HeadPlan | None = None, **kwargs: Any) -> Coordinator:
        plan = plan or HeadPlan.create(ParallelSettings(data_parallel_size=size))
        options = {"heartbeat_interval_s": 0.1, "engine_timeout_s": 30.0} | kwargs
        coordinator = Coordinator(plan, COMPAT, data_parallel_size=size, **options)
        made.append((coordinator, plan))
        coordinator.start()
        return coordinator

    yield make
    for coordinator, plan in made:
        coordinator.stop()
        plan.cleanup()


def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_welcome_tells_the_clients_and_registers(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator(size=2)
    welcome = engines(c, 1, 0xABC).register()
    assert welcome.clients == c._plan.clients_connect
    assert welcome.heartbeat_interval_s == 0.1
    holder = c.holders()[1]
    assert (holder.rank, holder.incarnation, holder.pid, holder.host) == (
        1,
        0xABC,
        1001,
        "fake-host",
    )
    assert set(c.holders()) == {1}


def test_rank_out_of_range_is_refused(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator(size=2)
    engine = engines(c, 2, 7)
    engine.hello()
    msg = engine.recv()
    assert isinstance(msg, EngineRefused)
    assert "rank 2 is outside 0..1" in msg.reason
    assert c.holders() == {}


def test_compat_mismatch_names_every_field(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 7)
    other = EngineCompat(**{**_fields(COMPAT), "dtype": "float16", "revision": "kubellm other"})
    engine.hello(other)
    msg = engine.recv()
    assert isinstance(msg, EngineRefused)
    assert "dtype: head 'auto', engine 'float16'" in msg.reason
    assert "revision:" in msg.reason
    assert "max_model_len" not in msg.reason
    assert c.holders() == {}


def _fields(compat: EngineCompat) -> dict[str, Any]:
    return {f: getattr(compat, f) for f in compat.__struct_fields__}


def test_second_live_incarnation_is_refused(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engines(c, 0, 1).register()
    rival = engines(c, 0, 2)
    rival.hello()
    msg = rival.recv()
    assert isinstance(msg, EngineRefused)
    assert "rank 0 is held by a live engine" in msg.reason
    assert c.holders()[0].incarnation == 1
    rival.sock.close(linger=0)  # the rival's disconnect does not free the holder's rank
    time.sleep(0.3)
    assert c.holders()[0].incarnation == 1


def test_rank_freed_after_engine_dead(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    first = engines(c, 0, 1)
    first.register()
    first.sock.send(encode(EngineDead(engine_index=0, incarnation=1, reason="bye", clean=True)))
    _eventually(lambda: 0 not in c.holders(), "rank 0 to be released")
    engines(c, 0, 2).register()
    assert c.holders()[0].incarnation == 2


def test_rank_freed_when_the_connection_drops(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    first = engines(c, 0, 1)
    first.register()
    first.sock.close(linger=0)
    _eventually(lambda: 0 not in c.holders(), "rank 0 to be released after the disconnect")
    engines(c, 0, 2).register()


def test_rank_freed_after_silence_but_kept_by_heartbeats(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator(engine_timeout_s=0.6)
    silent, beating = engines(c, 0, 1), engines(c, 1, 1)
    silent.register()
    beating.register()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        beating.heartbeat()
        time.sleep(0.1)
    assert 0 not in c.holders()
    assert c.holders()[1].incarnation == 1
    engines(c, 0, 2).register()


def test_repeated_hello_gets_the_same_welcome(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 5)
    first = engine.register()
    registered_at = c.holders()[0].registered_at
    assert engine.register() == first
    assert c.holders()[0].registered_at == registered_at


def test_head_beats_arrive_periodically(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 5)
    engine.register()
    beats: list[float] = []
    deadline = time.monotonic() + 10
    while len(beats) < 3 and time.monotonic() < deadline:
        msg = engine.recv(timeout=1.0, skip_beats=False)
        if isinstance(msg, HeadBeat):
            beats.append(msg.timestamp)
    assert len(beats) == 3
    assert beats == sorted(beats) and beats[0] < beats[-1]


def test_no_head_beats_before_registration(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 5)
    assert engine.recv(timeout=0.5, skip_beats=False) is None


def test_undecodable_frame_is_refused(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 5)
    engine.sock.send(b"\x81\xa3foo\x01")  # msgpack {"foo": 1}: no tagged message
    msg = engine.recv()
    assert isinstance(msg, EngineRefused)
    assert msg.reason.startswith(
        f"cannot decode your registration (this head speaks protocol {PROTOCOL_VERSION}): "
    )
    assert c.holders() == {}


def test_bind_failure_is_a_clear_error(make_coordinator: Callable[..., Coordinator]) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as taken:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        plan = HeadPlan(address, address, (), (), None)
        with pytest.raises(ValueError, match=f"cannot bind the coordinator on {address}"):
            make_coordinator(plan=plan)
        taken.setsockopt(zmq.LINGER, 0)


def test_stop_is_idempotent(make_coordinator: Callable[..., Coordinator]) -> None:
    c = make_coordinator()
    c.stop()
    c.stop()
    assert c.holders() == {}


# -- CURVE ------------------------------------------------------------------------------------


@pytest.fixture
def curve_dir(tmp_path: Path) -> str:
    create_curve_keys(tmp_path / "keys")
    return str(tmp_path / "keys")


def test_curve_engine_keys_register(
    engines: Engines, make_coordinator: Callable[..., Coordinator], curve_dir: str
) -> None:
    c = make_coordinator(curve_dir=curve_dir)
    engines(c, 0, 9, curve_dir).register()
    assert c.holders()[0].incarnation == 9


def test_curve_other_client_keys_get_nothing(
    engines: Engines,
    make_coordinator: Callable[..., Coordinator],
    curve_dir: str,
    tmp_path: Path,
) -> None:
    c = make_coordinator(curve_dir=curve_dir)
    # The head's real public key, but an engine key pair the head does not know.
    other = tmp_path / "other"
    create_curve_keys(other)
    (other / "head.key").write_bytes((Path(curve_dir) / "head.key").read_bytes())
    intruder = engines(c, 0, 9, str(other))
    intruder.hello()
    assert intruder.recv(timeout=1.0, skip_beats=False) is None
    assert c.holders() == {}
    plain = engines(c, 1, 9)  # no CURVE at all
    plain.hello()
    assert plain.recv(timeout=0.5, skip_beats=False) is None
    assert c.holders() == {}


def test_hello_must_match_the_routing_id(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    c = make_coordinator()
    engine = engines(c, 0, 1)
    engine.incarnation = 2  # its Hello now claims another incarnation than its routing id
    engine.hello()
    msg = engine.recv()
    assert isinstance(msg, EngineRefused)
    assert "routing id" in msg.reason
    assert c.holders() == {}


def test_start_twice_is_an_error(make_coordinator: Callable[..., Coordinator]) -> None:
    c = make_coordinator()
    with pytest.raises(RuntimeError, match="only once"):
        c.start()
    c.stop()
    with pytest.raises(RuntimeError, match="only once"):
        c.start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_registration_over_tcp_with_a_host_name(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    parallel = ParallelSettings(
        data_parallel_size=2,
        data_parallel_size_local=0,
        api_server_count=1,
        data_parallel_address="localhost",
        data_parallel_rpc_port=_free_port(),
    )
    plan = HeadPlan.create(parallel)
    c = make_coordinator(plan=plan)
    assert c._plan.coordinator_connect.startswith("tcp://localhost:")
    welcome = engines(c, 1, 3).register()
    assert welcome.clients[0].input == f"tcp://localhost:{parallel.data_parallel_rpc_port + 1}"
    assert set(c.holders()) == {1}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="::1 is not available on this host")
def test_registration_over_ipv6(
    engines: Engines, make_coordinator: Callable[..., Coordinator]
) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = int(s.getsockname()[1])
    parallel = ParallelSettings(
        data_parallel_size=1,
        data_parallel_size_local=0,
        api_server_count=1,
        data_parallel_address="::1",
        data_parallel_rpc_port=port,
    )
    c = make_coordinator(size=1, plan=HeadPlan.create(parallel))
    welcome = engines(c, 0, 3).register()
    assert welcome.clients[0].output == f"tcp://[::1]:{port + 2}"

"""The `kubellm-engine` process and its head: registration, refusal, timeouts, the head's
liveness and CURVE, driven through a fake head (`fake_head.FakeHead`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_head import FakeHead, identity_of  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.transport import create_curve_keys
from kubellm.protocol.messages import (
    EngineDead,
    EngineHello,
    EngineRefused,
    EngineStatus,
    HeadBeat,
    Heartbeat,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def head() -> Iterator[FakeHead]:
    fake = FakeHead(clients=2)
    try:
        yield fake
    finally:
        fake.close()


def _failed_status(head: FakeHead) -> EngineStatus:
    while (status := head.monitored(EngineStatus)).state != "failed":
        pass
    return status


def test_a_refused_engine_exits_1_naming_the_reason(head: FakeHead) -> None:
    proc = head.spawn(engine_index=3)
    hello = head.hello()
    assert hello.engine_index == 3 and head.identity == identity_of(hello)
    head.to_engine(EngineRefused(reason="revision: head 'a', engine 'b'"))
    code, err = head.wait(proc)
    assert code == 1
    assert f"the head at {head.address('coord')} refused engine 3: revision: head 'a'" in err
    assert "ERROR" in err and "Traceback" not in err
    assert "revision" in _failed_status(head).detail


def test_a_refusal_after_the_welcome_also_ends_the_engine(head: FakeHead) -> None:
    proc = head.spawn()
    head.admit()
    head.to_engine(EngineRefused(reason="rank 0 is held by another engine"))
    code, err = head.wait(proc)
    assert code == 1 and "rank 0 is held by another engine" in err
    assert not head.expect(0, EngineDead).clean


def test_hello_repeats_until_the_registration_timeout_then_exit_1(head: FakeHead) -> None:
    proc = head.spawn(registration_timeout_s=2.5)
    hellos = [head.hello(), head.hello(timeout=5)]  # HELLO_RETRY_S is 1 s
    assert len({(h.engine_index, h.incarnation) for h in hellos}) == 1
    code, err = head.wait(proc)
    assert code == 1
    assert f"no head at {head.address('coord')} accepted this engine within 2.5 s" in err
    assert "Traceback" not in err


def test_sigterm_while_registering_says_goodbye_to_the_head(head: FakeHead) -> None:
    proc = head.spawn()
    head.hello()
    code, _ = head.stop(proc)
    assert code == 0
    dead = head.from_engine(EngineDead)
    assert dead.clean and dead.reason == "stopped (SIGTERM)"


def _beat_for(head: FakeHead, seconds: float) -> None:
    """Act as a live head for a while: HeadBeats every 0.2 s."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        head.to_engine(HeadBeat(timestamp=time.time()))
        head.from_engine(Heartbeat, timeout=5)  # the engine beats back on this link


@pytest.mark.slow
def test_the_engine_exits_1_when_the_head_stops_beating(head: FakeHead) -> None:
    proc = head.spawn(head_timeout_s=1.0)
    head.admit()
    _beat_for(head, 2.5)  # longer than the head timeout: HeadBeats keep the engine alive
    assert proc.poll() is None
    silent_since = time.monotonic()
    code, err = head.wait(proc)
    assert code == 1
    assert time.monotonic() - silent_since < 1.0 + 10  # generous margin
    assert f"the head at {head.address('coord')} is gone (no HeadBeat for 1 s)" in err
    for client in (0, 1):
        dead = head.expect(client, EngineDead)
        assert not dead.clean and "is gone" in dead.reason


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    create_curve_keys(tmp_path / "keys")
    return tmp_path / "keys"


def test_curve_engine_registers_and_serves_with_the_right_keys(keys: Path) -> None:
    head = FakeHead(clients=1, curve_dir=keys)
    try:
        proc = head.spawn(curve_dir=str(keys))
        head.admit()
        assert head.utility(0, "ping").result == "pong"
        assert head.expect(0, Heartbeat).engine_index == 0
        assert head.stop(proc)[0] == 0
    finally:
        head.close()


def test_curve_engine_with_another_head_key_never_gets_a_welcome(
    keys: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    create_curve_keys(other)
    (other / "engine.key").write_bytes((keys / "engine.key").read_bytes())  # the ZAP allow-list
    head = FakeHead(clients=1, curve_dir=other)
    try:
        proc = head.spawn(curve_dir=str(keys), registration_timeout_s=1.5)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            assert not head.coordinator.poll(100), "a Hello got through a failed handshake"
        code, err = head.wait(proc)
        assert code == 1 and "accepted this engine within 1.5 s" in err
    finally:
        head.close()


def test_a_hello_carries_what_the_coordinator_checks(head: FakeHead) -> None:
    proc = head.spawn(revision="rev-9")
    hello: EngineHello = head.hello()
    assert hello.pid == proc.pid and hello.compat.revision.endswith("/rev-9")
    assert hello.compat.engine_backend == "dummy" and hello.host
    assert head.monitored(EngineStatus).state == "registering"
    assert head.stop(proc)[0] == 0

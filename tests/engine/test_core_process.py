"""The `kubellm-engine` process after registration: two API servers (clients), requests,
utilities, failures and exits, driven through a fake head (`fake_head.FakeHead`)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_head import ENGINE, FakeHead, identity_of  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.core import SHUTDOWN_ERROR
from kubellm.engine.transport import engine_compat
from kubellm.protocol.messages import (
    AbortRequests,
    AddRequest,
    DrainingAck,
    EngineDead,
    EngineDraining,
    EngineEvicted,
    EngineOutputs,
    EngineStatus,
    HeadBeat,
    Heartbeat,
    SamplingParams,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import EngineSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def head() -> Iterator[FakeHead]:
    fake = FakeHead(clients=2)
    try:
        yield fake
    finally:
        fake.close()


def _add(request_id: str, max_tokens: int = 4, prompt: tuple[int, ...] = (1, 2)) -> AddRequest:
    return AddRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
        arrival_time=0.0,
    )


def _states(head: FakeHead, until: str) -> list[str]:
    states: list[str] = []
    while not states or states[-1] != until:
        states.append(head.monitored(EngineStatus).state)
    return states


def test_ready_on_every_client_with_matching_facts_heartbeats_and_clean_exit(
    head: FakeHead,
) -> None:
    proc = head.spawn(max_model_len=128, revision="r7")
    hello, readies = head.admit()
    expected = engine_compat(
        EngineSettings(engine_backend="dummy", max_model_len=128, heartbeat_interval_s=0.2), "r7"
    )
    assert (hello.engine_index, hello.pid, hello.compat) == (0, proc.pid, expected)
    assert head.identity == identity_of(hello)
    assert readies[0].facts == readies[1].facts
    facts = readies[0].facts
    assert (facts.incarnation, facts.compat, facts.pid) == (hello.incarnation, expected, proc.pid)
    assert (facts.model, facts.max_model_len, facts.host) == ("dummy", 128, socket.gethostname())
    assert facts.supported_tasks == ("generate",)
    assert _states(head, "ready") == ["registering", "loading", "ready"]
    head.welcome()  # a repeated Welcome changes nothing
    head.to_engine(HeadBeat(timestamp=0.0))
    for client in (0, 1):
        beat = head.expect(client, Heartbeat)
        assert (beat.incarnation, beat.seconds_since_progress) == (hello.incarnation, 0.0)
    assert head.from_engine(Heartbeat).incarnation == hello.incarnation
    assert head.monitored(Heartbeat).incarnation == hello.incarnation
    code, _ = head.stop(proc)
    assert code == 0
    for client in (0, 1):
        dead = head.expect(client, EngineDead)
        assert dead.clean and dead.reason == "stopped (SIGTERM)"
    assert head.from_engine(EngineDead).clean
    assert head.monitored(EngineStatus).state == "stopped"


def test_utilities_are_answered_to_the_client_that_asked(head: FakeHead) -> None:
    proc = head.spawn()
    head.admit()
    assert head.utility(1, "ping").result == "pong"
    assert head.utility(0, "get_supported_tasks", 2).result == ["generate"]
    stats = head.utility(1, "get_stats", 3).result
    assert isinstance(stats, dict) and stats["num_running"] == 0
    assert head.utility(0, "reset_prefix_cache", 4).result is True
    unknown = head.utility(1, "format_disk", 5)
    assert unknown.result is None and unknown.error and "format_disk" in unknown.error
    # client 0 saw no answer meant for client 1: its next utility result is its own
    head.send(0, _utility(6))
    answers = head.outputs_until(0, UtilityResult)
    assert [m.call_id for m in answers if isinstance(m, UtilityResult)] == [6]
    assert head.stop(proc)[0] == 0


def _utility(call_id: int) -> UtilityRequest:
    return UtilityRequest(call_id=call_id, method="ping")


def _request_ids(messages: list[Any]) -> set[str]:
    return {o.request_id for m in messages if isinstance(m, EngineOutputs) for o in m.outputs}


def _until_finished(
    head: FakeHead, client: int, ids: set[str], first: tuple[Any, ...] = ()
) -> dict[str, list[Any]]:
    """`first` and everything a client's PULL gets after it until each of `ids` finished:
    request id → outputs."""
    got: dict[str, list[Any]] = {}
    for out in first:
        got.setdefault(out.request_id, []).append(out)
    while not ids <= {rid for rid, outs in got.items() if outs[-1].finish_reason}:
        for out in head.expect(client, EngineOutputs).outputs:
            got.setdefault(out.request_id, []).append(out)
    return got


def test_requests_are_answered_on_the_link_they_came_on(head: FakeHead) -> None:
    proc = head.spawn("token_delay_s=0.01", max_model_len=32)
    hello, _ = head.admit()
    head.send(0, _add("a", max_tokens=5))
    # Links are not ordered with one another: client 0's "a" must be running before client 1
    # reuses the id, or client 1's copy could be the one that is admitted.
    first = head.expect(0, EngineOutputs).outputs
    head.send(1, _add("b", max_tokens=3))
    head.send(1, _add("a"))  # the same id from another client is refused, to that client
    head.send(1, _add("too-long", prompt=tuple(range(40))))
    got = [
        _until_finished(head, 0, {"a"}, first),
        _until_finished(head, 1, {"a", "b", "too-long"}),
    ]
    assert set(got[0]) == {"a"} and set(got[1]) == {"a", "b", "too-long"}
    assert sum(len(o.new_token_ids) for o in got[0]["a"]) == 5
    assert got[0]["a"][-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in got[1]["b"]) == 3
    assert "already in use" in (got[1]["a"][-1].error or "")
    assert "max_model_len" in (got[1]["too-long"][-1].error or "")
    # Nothing else follows on either link (links are FIFO, so a utility result is a fence):
    for client in (0, 1):
        head.send(client, _utility(client))
        batches = [
            m for m in head.outputs_until(client, UtilityResult) if isinstance(m, EngineOutputs)
        ]
        assert batches == []
    head.send(0, _add("c", max_tokens=2))
    assert head.expect(0, EngineOutputs).incarnation == hello.incarnation
    assert head.stop(proc)[0] == 0


def test_abort_touches_only_the_requests_of_the_client_that_sent_it(head: FakeHead) -> None:
    proc = head.spawn("token_delay_s=0.02")
    head.admit()
    head.send(0, _add("long-0", max_tokens=100_000))
    head.send(1, _add("long-1", max_tokens=100_000))
    head.expect(0, EngineOutputs)
    head.send(1, AbortRequests(request_ids=("long-0", "long-1")))
    assert head.finished(1, "long-1")[-1].finish_reason == "abort"
    head.send(1, _utility(1))
    head.outputs_until(1, UtilityResult)
    stats = head.utility(0, "get_stats", 2).result
    assert isinstance(stats, dict) and stats["num_running"] == 1  # long-0 still runs
    head.send(0, AbortRequests(request_ids=("long-0",)))
    assert head.finished(0, "long-0")[-1].finish_reason == "abort"
    assert head.stop(proc)[0] == 0


def _start_draining(
    head: FakeHead, proc: subprocess.Popen[str], rid: str, max_tokens: int
) -> tuple[Any, ...]:
    """Start request `rid` on client 0, SIGTERM the engine once it runs; the outputs client 0
    got before its EngineDraining (which both clients get)."""
    head.send(0, _add(rid, max_tokens=max_tokens))
    first = head.expect(0, EngineOutputs).outputs
    proc.send_signal(signal.SIGTERM)
    before = head.outputs_until(0, EngineDraining)
    assert head.expect(1, EngineDraining).deadline_s == before[-1].deadline_s
    assert (
        _last_status(head, "draining").detail == "SIGTERM: up to " + f"{before[-1].deadline_s:g} s"
    )
    return first + tuple(o for m in before if isinstance(m, EngineOutputs) for o in m.outputs)


def test_sigterm_drains_running_and_late_requests_then_exits_0(head: FakeHead) -> None:
    proc = head.spawn("token_delay_s=0.01", drain_timeout_s=30.0)
    head.admit()
    seen = _start_draining(head, proc, "r", max_tokens=60)
    head.send(1, _add("late", max_tokens=3))  # sent before client 1 "heard": still served
    for client in (0, 1):
        head.send(client, DrainingAck(client_index=client))
    got = [_until_finished(head, 0, {"r"}, seen), _until_finished(head, 1, {"late"})]
    assert sum(len(o.new_token_ids) for o in got[0]["r"]) == 60
    assert sum(len(o.new_token_ids) for o in got[1]["late"]) == 3
    assert got[0]["r"][-1].finish_reason == got[1]["late"][-1].finish_reason == "length"
    code, err = head.wait(proc)
    assert code == 0, err
    for client in (0, 1):
        dead = head.expect(client, EngineDead)
        assert dead.clean and dead.reason == "stopped (SIGTERM, drained)"
    assert head.from_engine(EngineDead).clean
    assert _last_status(head, "stopped").detail == "stopped (SIGTERM, drained)"


def test_an_idle_draining_engine_waits_for_every_client_s_ack(head: FakeHead) -> None:
    proc = head.spawn(drain_timeout_s=30.0)
    head.admit()
    proc.send_signal(signal.SIGTERM)
    head.expect(0, EngineDraining)
    head.send(0, DrainingAck(client_index=0))
    head.send(1, _add("in-flight", max_tokens=2))  # sent before client 1 heard
    assert _until_finished(head, 1, {"in-flight"})["in-flight"][-1].finish_reason == "length"
    assert proc.poll() is None  # idle, but client 1 has not answered (it waits up to 5 s)
    head.send(1, DrainingAck(client_index=1))
    assert head.wait(proc)[0] == 0
    assert head.expect(1, EngineDead).clean


def test_a_drain_past_its_deadline_fails_what_is_left_and_exits_0(head: FakeHead) -> None:
    proc = head.spawn("token_delay_s=0.01", drain_timeout_s=0.5)
    head.admit()
    seen = _start_draining(head, proc, "long", max_tokens=100_000)
    outs = _until_finished(head, 0, {"long"}, seen)["long"]
    assert outs[-1].finish_reason == "error"
    assert SHUTDOWN_ERROR in (outs[-1].error or "") and "0.5 s" in (outs[-1].error or "")
    code, err = head.wait(proc)
    assert code == 0 and "failing 1 request(s)" in err, err
    assert head.expect(0, EngineDead).clean


def test_a_second_sigterm_ends_the_drain_at_once(head: FakeHead) -> None:
    proc = head.spawn("token_delay_s=0.01", drain_timeout_s=60.0)
    head.admit()
    _start_draining(head, proc, "long", max_tokens=100_000)
    proc.send_signal(signal.SIGTERM)
    code, err = head.wait(proc, timeout=20.0)  # generous; far below the 60 s drain
    assert code == 0, err
    dead = head.expect(0, EngineDead)
    assert dead.clean and dead.reason == "stopped (SIGTERM)"


def _pickle_payload(marker: Path) -> bytes:
    """A hostile protocol-0 pickle stream, written by hand (the project never imports pickle):
    unpickling it would call builtins.open(marker, "w") and so create `marker`."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def test_pickle_and_garbage_frames_are_dropped_and_the_engine_lives(head: FakeHead) -> None:
    marker = Path(head.dir) / "pwned"
    proc = head.spawn()
    head.admit()
    head.send_raw(1, _pickle_payload(marker))
    head.send_raw(0, b"\xc1 not msgpack")
    head.send_raw(0, b"two", b"frames")
    head.coordinator.send_multipart([head.identity, b"\xc1 bad head frame"])
    assert head.utility(0, "ping").result == "pong"
    assert head.utility(1, "ping", 2).result == "pong"
    head.expect(0, Heartbeat)  # the watcher lives too
    assert proc.poll() is None
    assert not marker.exists()
    code, err = head.stop(proc)
    assert code == 0
    assert err.count("dropped a bad frame") == 3 and "dropped a message of 2 frames" in err


def test_eviction_makes_the_engine_exit_1(head: FakeHead) -> None:
    proc = head.spawn()
    head.admit()
    head.send(1, EngineEvicted(reason="facts do not match"))
    code, err = head.wait(proc)
    assert code == 1
    assert "API server 1 evicted this engine: facts do not match" in err
    dead = head.expect(0, EngineDead)
    assert not dead.clean and "facts do not match" in dead.reason
    assert "facts do not match" in _last_status(head, "failed").detail


def _last_status(head: FakeHead, state: str) -> EngineStatus:
    while (status := head.monitored(EngineStatus)).state != state:
        pass
    return status


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [("startup_fail=1", "startup_fail"), ("token_delay_s=oops", "token_delay_s")],
)
def test_startup_failure_after_the_welcome_tells_the_head(
    head: FakeHead, behaviour: str, reason: str
) -> None:
    proc = head.spawn(behaviour)
    head.hello()
    head.welcome()
    dead = head.from_engine(EngineDead, timeout=20)
    assert reason in dead.reason and not dead.clean
    assert head.wait(proc)[0] == 1
    states = _states(head, "failed")
    assert states[-2:] == ["loading", "failed"]


def test_a_bad_model_path_fails_before_registering(head: FakeHead) -> None:
    proc = head.spawn(engine_backend="model", model="/nonexistent/model-dir")
    code, err = head.wait(proc)
    assert code == 1
    assert "start-up failed" in err and "does not exist" in err and "Traceback" not in err
    assert "registering" not in err, "the engine tried to register with a bad model"
    assert [s.state for s in (head.monitored(EngineStatus), head.monitored(EngineStatus))] == [
        "registering",
        "failed",
    ]


def test_exception_in_step_sends_engine_dead_everywhere_and_exits_1(head: FakeHead) -> None:
    proc = head.spawn("raise_after_tokens=2")
    head.admit()
    head.send(1, _add("r", max_tokens=9))
    for client in (0, 1):
        dead = head.expect(client, EngineDead)
        assert "raise_after_tokens" in dead.reason and not dead.clean
    assert not head.from_engine(EngineDead).clean
    assert head.wait(proc)[0] == 1


def test_hung_step_keeps_heartbeating_with_growing_progress_age(head: FakeHead) -> None:
    proc = head.spawn("hang_after_tokens=1")
    head.admit()
    head.send(0, _add("r", max_tokens=9))
    for _ in range(100):  # 20 s of beats at most
        beat = head.expect(1, Heartbeat)
        if beat.seconds_since_progress >= 1.0:
            break
    else:
        pytest.fail("seconds_since_progress does not grow")
    assert beat.stats.num_running == 1
    assert head.stop(proc)[0] == 0  # SIGTERM still ends a hung step


PARENT = """
import json, os, subprocess, sys
config = json.loads(sys.argv[1])
config["parent_pid"] = os.getpid()
engine = subprocess.Popen([*sys.argv[2:], "--config-json", json.dumps(config)])
print(engine.pid, flush=True)
engine.wait()
"""


def test_engine_exits_0_when_its_parent_is_killed(head: FakeHead) -> None:
    script = (
        "import ctypes, os, subprocess, sys\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
        "parent = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]], stdout=subprocess.PIPE)\n"
        "engine = int(parent.stdout.readline())\n"
        "print(engine, flush=True)\n"
        "sys.stdin.readline()\n"
        "parent.kill()\n"
        "parent.wait()\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(engine, 0)[1]), flush=True)\n"
    )
    config = json.loads(head.config())
    reaper = subprocess.Popen(
        [sys.executable, "-c", script, PARENT, json.dumps(config), *ENGINE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reaper.stdin is not None and reaper.stdout is not None
        int(reaper.stdout.readline())
        head.admit()
        reaper.stdin.write("go\n")
        reaper.stdin.flush()
        out, _ = reaper.communicate(timeout=20)  # generous; the design target is about 2 s
        assert int(out.strip()) == 0
        dead = head.expect(0, EngineDead)
        assert dead.clean
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.communicate(timeout=10)


def test_engine_core_modules_do_not_import_torch() -> None:
    code = (
        "import sys, kubellm.engine.core, kubellm.engine.cli, kubellm.engine.dummy; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_an_invalid_config_json_exits_2_naming_the_field() -> None:
    old_style = '{"settings": {}, "input_address": "ipc:///x", "output_address": "ipc:///y"}'
    proc = subprocess.run(
        [*ENGINE, "--config-json", old_style], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid --config-json" in proc.stderr and "coordinator_address" in proc.stderr

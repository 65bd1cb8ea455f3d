"""The `kubellm-engine` process, driven through raw client sockets (no EngineClient)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psutil
import pytest
import zmq

from kubellm.engine.transport import EngineCoreConfig, engine_identity
from kubellm.protocol.codec import encode, engine_to_client_decoder
from kubellm.protocol.messages import (
    AddRequest,
    EngineDead,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    RequestOutput,
    SamplingParams,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import EngineSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

M = TypeVar("M", bound=msgspec.Struct)
ENGINE = [sys.executable, "-m", "kubellm.engine.cli"]


class RawClient:
    """The client end of the engine protocol with plain sockets, to poke an engine directly."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kl-test-")  # short: ipc paths are length-limited
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{self.dir}/in")
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(f"ipc://{self.dir}/out")
        self.decoder = engine_to_client_decoder()
        self.procs: list[subprocess.Popen[str]] = []

    def config(self, behaviour: str = "", parent_pid: int | None = None, **engine: Any) -> str:
        settings = EngineSettings.model_validate(
            {"engine_backend": "dummy", "dummy_behaviour": behaviour, "heartbeat_interval_s": 0.2}
            | engine
        )
        return EngineCoreConfig(
            settings=settings,
            input_address=f"ipc://{self.dir}/in",
            output_address=f"ipc://{self.dir}/out",
            parent_pid=parent_pid,
        ).model_dump_json()

    def spawn(self, behaviour: str = "", **engine: Any) -> subprocess.Popen[str]:
        config = self.config(behaviour, parent_pid=os.getpid(), **engine)
        proc = subprocess.Popen(
            [*ENGINE, "--config-json", config], stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def ready(self, timeout: float = 20.0) -> EngineReady:
        assert self.router.poll(int(timeout * 1000)), "no EngineReady"
        identity, frame = self.router.recv_multipart()
        assert identity == engine_identity(0)
        msg = self.decoder.decode(frame)
        assert isinstance(msg, EngineReady)
        return msg

    def send(self, msg: msgspec.Struct) -> None:
        self.send_raw(encode(msg))

    def send_raw(self, frame: bytes) -> None:
        self.router.send_multipart([engine_identity(0), frame])

    def expect(self, kind: type[M], timeout: float = 10.0) -> M:
        """The next output message of this type (others are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.pull.poll(int(left * 1000) + 1):
                msg = self.decoder.decode(self.pull.recv())
                if isinstance(msg, kind):
                    return msg
        raise AssertionError(f"no {kind.__name__} within {timeout} s")

    def outputs_until_finished(self, request_id: str) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        while not outs or outs[-1].finish_reason is None:
            outs += [o for o in self.expect(EngineOutputs).outputs if o.request_id == request_id]
        return outs

    def utility(self, method: str, call_id: int = 1) -> UtilityResult:
        self.send(UtilityRequest(call_id=call_id, method=method))
        result = self.expect(UtilityResult)
        assert result.call_id == call_id
        return result

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def raw() -> Iterator[RawClient]:
    client = RawClient()
    try:
        yield client
    finally:
        client.close()


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_handshake_heartbeat_utilities_and_clean_exit(raw: RawClient) -> None:
    proc = raw.spawn(max_model_len=128)
    facts = raw.ready().facts
    assert (facts.model, facts.max_model_len, facts.pid) == ("dummy", 128, proc.pid)
    assert facts.supported_tasks == ("generate",)
    beat = raw.expect(Heartbeat)
    assert beat.seconds_since_progress == 0.0 and beat.stats.num_running == 0
    assert raw.utility("ping").result == "pong"
    assert raw.utility("get_supported_tasks", 2).result == ["generate"]
    stats = raw.utility("get_stats", 3).result
    assert isinstance(stats, dict) and stats["num_running"] == 0
    assert raw.utility("reset_prefix_cache", 4).result is True
    unknown = raw.utility("format_disk", 5)
    assert unknown.result is None and unknown.error and "format_disk" in unknown.error
    assert _stop(proc)[0] == 0


def test_requests_stream_and_invalid_requests_fail_alone(raw: RawClient) -> None:
    proc = raw.spawn(max_model_len=32)
    raw.ready()
    sampling = SamplingParams(max_tokens=4)
    raw.send(
        AddRequest(
            request_id="too-long",
            prompt_token_ids=tuple(range(40)),
            sampling=sampling,
            arrival_time=0.0,
        )
    )
    failed = raw.outputs_until_finished("too-long")
    assert failed[-1].finish_reason == "error" and "max_model_len" in (failed[-1].error or "")
    raw.send(
        AddRequest(request_id="ok", prompt_token_ids=(1, 2), sampling=sampling, arrival_time=0.0)
    )
    outs = raw.outputs_until_finished("ok")
    assert sum(len(o.new_token_ids) for o in outs) == 4 and outs[-1].finish_reason == "length"
    assert _stop(proc)[0] == 0


def _pickle_payload(marker: Path) -> bytes:
    """A hostile protocol-0 pickle stream, written by hand (the project never imports pickle):
    unpickling it would call builtins.open(marker, "w") and so create `marker`."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def test_pickle_and_garbage_frames_are_dropped_and_the_engine_lives(raw: RawClient) -> None:
    marker = Path(raw.dir) / "pwned"
    proc = raw.spawn()
    raw.ready()
    raw.send_raw(_pickle_payload(marker))
    raw.send_raw(b"\xc1 not msgpack")
    raw.router.send_multipart([engine_identity(0), b"two", b"frames"])
    assert raw.utility("ping").result == "pong"
    assert proc.poll() is None
    assert not marker.exists()
    code, err = _stop(proc)
    assert code == 0
    assert err.count("dropped a bad frame") == 2 and "dropped a message of 2 frames" in err


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        ({"behaviour": "startup_fail=1"}, "startup_fail"),
        ({"engine_backend": "model", "model": "/nonexistent/model-dir"}, "does not exist"),
        ({"behaviour": "token_delay_s=oops"}, "token_delay_s"),
    ],
)
def test_startup_failure_sends_engine_dead_and_exits_1(
    raw: RawClient, engine: dict[str, Any], reason: str
) -> None:
    proc = raw.spawn(**engine)
    dead = raw.expect(EngineDead, timeout=20)
    assert reason in dead.reason
    assert proc.wait(timeout=10) == 1


def test_exception_in_step_sends_engine_dead_and_exits_1(raw: RawClient) -> None:
    proc = raw.spawn("raise_after_tokens=2")
    raw.ready()
    raw.send(
        AddRequest(
            request_id="r",
            prompt_token_ids=(1,),
            sampling=SamplingParams(max_tokens=9),
            arrival_time=0.0,
        )
    )
    dead = raw.expect(EngineDead)
    assert "raise_after_tokens" in dead.reason
    assert proc.wait(timeout=10) == 1


def test_hung_step_keeps_heartbeating_with_growing_progress_age(raw: RawClient) -> None:
    proc = raw.spawn("hang_after_tokens=1")
    raw.ready()
    raw.send(
        AddRequest(
            request_id="r",
            prompt_token_ids=(1,),
            sampling=SamplingParams(max_tokens=9),
            arrival_time=0.0,
        )
    )
    deadline = time.monotonic() + 15
    while (beat := raw.expect(Heartbeat)).seconds_since_progress < 1.0:
        assert time.monotonic() < deadline, "seconds_since_progress does not grow"
    assert beat.stats.num_running == 1
    assert _stop(proc)[0] == 0  # SIGTERM still ends a hung step


PARENT = """
import json, os, subprocess, sys
config = json.loads(sys.argv[1])
config["parent_pid"] = os.getpid()
engine = subprocess.Popen(
    [*sys.argv[2:], "--config-json", json.dumps(config)], stdout=subprocess.DEVNULL
)
print(engine.pid, flush=True)
engine.wait()
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_engine_exits_when_its_parent_is_killed(raw: RawClient) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, raw.config(), *ENGINE], stdout=subprocess.PIPE, text=True
    )
    engine_pid = -1
    try:
        assert parent.stdout is not None
        engine_pid = int(parent.stdout.readline())
        raw.ready()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10  # generous; the design target is about 2 s
        while not _gone(engine_pid):
            assert time.monotonic() < deadline, "engine outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.communicate(timeout=10)
        if engine_pid > 0 and not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def test_engine_core_modules_do_not_import_torch() -> None:
    code = (
        "import sys, kubellm.engine.core, kubellm.engine.cli, kubellm.engine.dummy; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0

"""A fake head for engine-core tests: raw sync ZMQ sockets on ipc in a private temp dir.

It binds what a head binds (docs/design/0003-scale-out.md): the coordinator ROUTER and, per
API server ("client"), a ROUTER for requests and a PULL for outputs; plus a PULL standing in for
a headless supervisor's monitor. Engines are real `kubellm-engine` subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from kubellm.engine.transport import EngineCoreConfig, curve_server, engine_identity
from kubellm.protocol.codec import (
    Decoder,
    encode,
    engine_to_client_decoder,
    engine_to_coordinator_decoder,
    engine_to_monitor_decoder,
)
from kubellm.protocol.messages import (
    ClientAddress,
    EngineHello,
    EngineOutputs,
    EngineReady,
    EngineWelcome,
    RequestOutput,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import EngineSettings

M = TypeVar("M", bound=msgspec.Struct)
ENGINE = [sys.executable, "-m", "kubellm.engine.cli"]
HEARTBEAT_S = 0.2


def _recv(sock: zmq.Socket[bytes], decoder: Decoder[Any], kind: type[M], timeout: float) -> M:
    """The next message of this type on a PULL or ROUTER (others are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            msg = decoder.decode(sock.recv_multipart()[-1])
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


class FakeHead:
    """The head end of every engine link, to drive one engine core directly."""

    def __init__(self, clients: int = 2, curve_dir: Path | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="kl-")  # short: ipc paths are length-limited
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        if curve_dir is not None:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(curve_dir))
        self.head_keys = curve_dir
        self.coordinator = self._bind(zmq.ROUTER, "coord")
        self.inputs = [self._bind(zmq.ROUTER, f"in{i}") for i in range(clients)]
        self.outputs = [self._bind(zmq.PULL, f"out{i}") for i in range(clients)]
        self.monitor = self.ctx.socket(zmq.PULL)
        self.monitor.bind(self.address("mon"))
        self.identity = b""
        self.procs: list[subprocess.Popen[str]] = []
        self._to_client = engine_to_client_decoder()
        self._to_coordinator = engine_to_coordinator_decoder()
        self._to_monitor = engine_to_monitor_decoder()

    def address(self, name: str) -> str:
        return f"ipc://{self.dir}/{name}"

    def _bind(self, kind: int, name: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        if self.head_keys is not None:
            curve_server(sock, str(self.head_keys))
        sock.bind(self.address(name))
        return sock

    # -- the engine process ----------------------------------------------------------------------

    def config(self, behaviour: str = "", **fields: Any) -> str:
        """EngineCoreConfig JSON: dummy backend, 0.2 s heartbeats; `fields` go to the config
        when they are config fields, to the engine settings otherwise."""
        config_fields = set(EngineCoreConfig.model_fields) - {"settings"}
        engine = {k: v for k, v in fields.items() if k not in config_fields}
        settings = EngineSettings.model_validate(
            {"engine_backend": "dummy", "dummy_behaviour": behaviour}
            | {"heartbeat_interval_s": HEARTBEAT_S}
            | engine
        )
        defaults: dict[str, Any] = {
            "coordinator_address": self.address("coord"),
            "monitor_address": self.address("mon"),
            "registration_timeout_s": 20.0,
        }
        rest = {k: v for k, v in fields.items() if k in config_fields}
        return EngineCoreConfig(settings=settings, **(defaults | rest)).model_dump_json()

    def spawn(self, behaviour: str = "", **fields: Any) -> subprocess.Popen[str]:
        config = self.config(behaviour, parent_pid=os.getpid(), **fields)
        proc = subprocess.Popen(
            [*ENGINE, "--config-json", config], stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
        """SIGTERM; the exit code and stderr."""
        proc.send_signal(signal.SIGTERM)
        return FakeHead.wait(proc)

    @staticmethod
    def wait(proc: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str]:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err

    # -- the coordinator -------------------------------------------------------------------------

    def hello(self, timeout: float = 20.0) -> EngineHello:
        """The next EngineHello; remembers the engine's routing id."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.coordinator.poll(int(left * 1000) + 1):
                identity, frame = self.coordinator.recv_multipart()
                msg = self._to_coordinator.decode(frame)
                if isinstance(msg, EngineHello):
                    self.identity = identity
                    return msg
        raise AssertionError(f"no EngineHello within {timeout} s")

    def to_engine(self, msg: msgspec.Struct) -> None:
        """Send on the coordinator link."""
        self.coordinator.send_multipart([self.identity, encode(msg)])

    def welcome(self) -> None:
        clients = tuple(
            ClientAddress(input=self.address(f"in{i}"), output=self.address(f"out{i}"))
            for i in range(len(self.inputs))
        )
        self.to_engine(EngineWelcome(clients=clients, heartbeat_interval_s=HEARTBEAT_S))

    def from_engine(self, kind: type[M], timeout: float = 10.0) -> M:
        """The next message of this type on the coordinator link."""
        return _recv(self.coordinator, self._to_coordinator, kind, timeout)

    def admit(self) -> tuple[EngineHello, list[EngineReady]]:
        """Hello → Welcome → EngineReady from every client link."""
        hello = self.hello()
        self.welcome()
        return hello, [self.ready(c) for c in range(len(self.inputs))]

    # -- the clients -----------------------------------------------------------------------------

    def ready(self, client: int, timeout: float = 20.0) -> EngineReady:
        sock = self.inputs[client]
        assert sock.poll(int(timeout * 1000)), f"no EngineReady on client {client}"
        identity, frame = sock.recv_multipart()
        assert identity == self.identity
        msg = self._to_client.decode(frame)
        assert isinstance(msg, EngineReady)
        return msg

    def send(self, client: int, msg: msgspec.Struct) -> None:
        self.send_raw(client, encode(msg))

    def send_raw(self, client: int, *frames: bytes) -> None:
        self.inputs[client].send_multipart([self.identity, *frames])

    def expect(self, client: int, kind: type[M], timeout: float = 10.0) -> M:
        """The next message of this type on a client's PULL (others are skipped)."""
        return _recv(self.outputs[client], self._to_client, kind, timeout)

    def outputs_until(self, client: int, kind: type[M], timeout: float = 10.0) -> list[Any]:
        """Everything on a client's PULL up to and including the next message of `kind`."""
        seen: list[Any] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.outputs[client].poll(int(left * 1000) + 1):
                seen.append(self._to_client.decode(self.outputs[client].recv()))
                if isinstance(seen[-1], kind):
                    return seen
        raise AssertionError(f"no {kind.__name__} on client {client} within {timeout} s")

    def finished(self, client: int, request_id: str) -> list[RequestOutput]:
        """This request's outputs on a client's PULL until it finishes."""
        outs: list[RequestOutput] = []
        while not outs or outs[-1].finish_reason is None:
            batch = self.expect(client, EngineOutputs)
            outs += [o for o in batch.outputs if o.request_id == request_id]
        return outs

    def utility(self, client: int, method: str, call_id: int = 1) -> UtilityResult:
        self.send(client, UtilityRequest(call_id=call_id, method=method))
        result = self.expect(client, UtilityResult)
        assert result.call_id == call_id
        return result

    def monitored(self, kind: type[M], timeout: float = 10.0) -> M:
        return _recv(self.monitor, self._to_monitor, kind, timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


def identity_of(hello: EngineHello) -> bytes:
    return engine_identity(hello.engine_index, hello.incarnation)

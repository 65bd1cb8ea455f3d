"""The EngineCore process: registers with a head, drives one backend, serves every API server.

Start-up (docs/design/0003-scale-out.md): compute the engine's `EngineCompat` (a bad model
path fails here), register with the head's coordinator (`kubellm.engine.registration`), hand
the coordinator link to the watcher thread, load the backend, then connect a DEALER (routing id
`engine_identity(rank, incarnation)`) and a PUSH to every client named in the `EngineWelcome`
and send `EngineReady` on each DEALER.

The main loop polls every client's DEALER, steps the backend, and answers each request on the
link it arrived on. The watcher (`kubellm.engine.watcher`) owns its own sockets: heartbeats to
every client, the coordinator and the local monitor; it ends the process when the head or the
parent goes away. State changes go to the local monitor as `EngineStatus` (never blocking).

Exit codes: 0 after SIGTERM/SIGINT or the parent's death; 1 after a fatal error, a refusal, a
registration timeout, an eviction or the head's loss. `EngineDead` goes to every link that
exists first (`clean=True` when told to stop).

Draining (`EngineCoreConfig.drain_timeout_s` > 0, headless engines): the first SIGTERM/SIGINT
while the loop runs does not stop it. The engine sends `EngineDraining` on every client link,
reports "draining" to its monitor, and keeps stepping and accepting requests (they were sent
before the client heard) until nothing is left and every client answered `DrainingAck` (or
`DRAIN_ACK_WAIT_S` passed), or until the deadline; what is left then fails with an error
output; then `EngineDead(clean=True)` and exit 0. A second signal, or the watcher ending the
process (head or parent gone), stops it at once as without a drain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import FrameType

import msgspec
import zmq

from kubellm.engine.backend import EngineBackend, InvalidRequest
from kubellm.engine.config import ModelConfig
from kubellm.engine.dummy import DummyEngine
from kubellm.engine.model_files import resolve_model
from kubellm.engine.parent import set_parent_death_signal
from kubellm.engine.registration import RegistrationFailed, register
from kubellm.engine.transport import (
    INPUT_HWM,
    OUTPUT_HWM,
    EngineCoreConfig,
    curve_client,
    engine_compat,
    engine_identity,
    goodbye_linger_ms,
    set_socket_options,
)
from kubellm.engine.watcher import ProgressClock, Watcher
from kubellm.protocol.codec import BadFrame, client_to_engine_decoder, encode
from kubellm.protocol.messages import (
    AbortRequests,
    AddRequest,
    DrainingAck,
    EngineCompat,
    EngineDead,
    EngineDraining,
    EngineEvicted,
    EngineFacts,
    EngineHello,
    EngineOutputs,
    EngineReady,
    EngineState,
    EngineStatus,
    EngineWelcome,
    RequestOutput,
    SchedulerStats,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import EngineSettings

__all__ = ["EngineCoreConfig", "build_backend", "run_engine_core"]

logger = logging.getLogger(__name__)

_BUSY_POLL_MS = 0
_MAX_MESSAGES_PER_DRAIN = 1024
"""Messages handled per link between two steps at most, so a flood cannot starve steps."""
_MONITOR_HWM = 100
_MONITOR_LINGER_MS = 500
_DRAIN_POLL_MS = 50
"""Idle poll while draining, so that the end of the drain is noticed soon."""
DRAIN_ACK_WAIT_S = 5.0
"""How long an idle draining engine waits for the `DrainingAck` of every client (an API server
that is gone never answers)."""
SHUTDOWN_ERROR = "the engine shut down before this request finished"

UtilityValue = str | int | float | bool | list[str] | dict[str, float] | None


class _Shutdown(BaseException):
    """Raised by the SIGTERM/SIGINT handler to unwind the main thread."""


class _Evicted(Exception):
    """An API server sent `EngineEvicted` (already logged at ERROR)."""


@dataclass
class _Drain:
    """A graceful stop in progress (times are time.monotonic())."""

    signal_name: str
    started: float
    deadline: float
    acked: set[int] = field(default_factory=set)
    """Clients that answered `DrainingAck`."""


def build_backend(settings: EngineSettings) -> EngineBackend:
    """The backend named by `settings.engine_backend`; the model backend is imported lazily."""
    if settings.engine_backend == "dummy":
        return DummyEngine(settings)
    if settings.model is not None:
        # Fail fast on a bad path or an unsupported checkpoint, before torch is imported.
        ModelConfig.from_dir(resolve_model(settings.model))
    from kubellm.engine.llm_engine import LLMEngine

    return LLMEngine.from_settings(settings)


class EngineCore:
    """One engine core: its links, its backend and the busy loop."""

    def __init__(self, config: EngineCoreConfig):
        self.config = config
        self.index = config.engine_index
        self.incarnation = secrets.randbits(63)
        self.identity = engine_identity(self.index, self.incarnation)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.clock = ProgressClock()
        self.latest_stats = SchedulerStats()
        self.watcher = Watcher(
            self.ctx, config, self.incarnation, self.clock, lambda: self.latest_stats, self.connect
        )
        self.coordinator: zmq.Socket[bytes] | None = None
        """The coordinator link while the main thread owns it (until the welcome)."""
        self.welcomed = False
        self.dealers: list[zmq.Socket[bytes]] = []
        self.pushes: list[zmq.Socket[bytes]] = []
        self.owners: dict[str, int] = {}
        """request id → index of the client that sent it."""
        self.poller = zmq.Poller()
        self.monitor = self._open_monitor()
        self._decoder = client_to_engine_decoder()
        self._finished = False
        self._watcher_ended = True
        self._dropped: set[int] = set()
        self.serving = False
        """`EngineReady` went out: clients may send requests, so a signal starts a drain (the
        loop begins it) rather than stopping at once."""
        self.drain_signal: str | None = None
        """Set by the first signal when the engine drains; the loop then starts the drain."""
        self.drain: _Drain | None = None

    def request_drain(self, signal_name: str) -> bool:
        """Called by the signal handler: whether this signal starts a drain (rather than
        stopping the engine at once)."""
        if self.config.drain_timeout_s <= 0 or not self.serving or self.drain_signal is not None:
            return False
        if self.watcher.exit_request is not None:  # the watcher ends the process: no drain
            return False
        self.drain_signal = signal_name
        return True

    # -- links -----------------------------------------------------------------------------------

    def connect(self, sock: zmq.Socket[bytes], address: str) -> None:
        """Connect a socket to a head address, as a CURVE client when configured."""
        if self.config.curve_dir:
            curve_client(sock, self.config.curve_dir)
        sock.connect(address)

    def _open_monitor(self) -> zmq.Socket[bytes] | None:
        if not self.config.monitor_address:
            return None
        sock = self.ctx.socket(zmq.PUSH)
        set_socket_options(sock, receives=False, hwm=_MONITOR_HWM, linger_ms=0)
        sock.connect(self.config.monitor_address)  # local ipc: no CURVE
        return sock

    def status(self, state: EngineState, detail: str = "") -> None:
        """Tell the local monitor (if any) about a state change; never blocks."""
        if self.monitor is None:
            return
        msg = EngineStatus(
            engine_index=self.index,
            incarnation=self.incarnation,
            state=state,
            detail=detail,
            timestamp=time.time(),
        )
        try:
            self.monitor.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("status %s not sent: the monitor is not reading", state)

    # -- start-up --------------------------------------------------------------------------------

    def start(self) -> EngineBackend:
        """Register, load the backend and connect to every client; returns the backend."""
        self.status("registering")
        compat = engine_compat(self.config.settings, self.config.revision)
        welcome = self.register(compat)
        self.status("loading")
        started = time.monotonic()
        backend = build_backend(self.config.settings)
        self.latest_stats = backend.stats()
        facts = self.facts(backend, compat)
        self.connect_clients(welcome, facts)
        self.status("ready")
        logger.info(
            "engine %d ready in %.1f s for %d API server(s): model %s, max_model_len %d, "
            "%d KV blocks of %d, %s/%s",
            self.index,
            time.monotonic() - started,
            len(welcome.clients),
            facts.model,
            facts.max_model_len,
            facts.num_kv_blocks,
            facts.block_size,
            facts.device,
            facts.dtype,
        )
        return backend

    def register(self, compat: EngineCompat) -> EngineWelcome:
        """Register with the coordinator, then hand its link to the watcher."""
        address = self.config.coordinator_address
        sock = self.ctx.socket(zmq.DEALER)
        self.coordinator = sock
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        set_socket_options(sock, receives=True, hwm=INPUT_HWM, linger_ms=0)
        self.connect(sock, address)
        logger.info(
            "engine %d (incarnation %016x) registering with the head at %s",
            self.index,
            self.incarnation,
            address,
        )
        hello = EngineHello(
            engine_index=self.index,
            incarnation=self.incarnation,
            compat=compat,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        welcome = register(sock, self.config, hello)
        self.coordinator, self.welcomed = None, True
        self.watcher.adopt_coordinator(sock)
        if self.config.head_timeout_s <= welcome.heartbeat_interval_s:
            logger.warning(
                "head timeout %g s is not longer than the head's heartbeat interval %g s",
                self.config.head_timeout_s,
                welcome.heartbeat_interval_s,
            )
        logger.info("engine %d welcomed by the head at %s", self.index, address)
        return welcome

    def connect_clients(self, welcome: EngineWelcome, facts: EngineFacts) -> None:
        """A DEALER and a PUSH to every client; `EngineReady` on each DEALER."""
        ready = encode(EngineReady(facts=facts))
        self.serving = True
        for client in welcome.clients:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, self.identity)
            set_socket_options(dealer, receives=True, hwm=INPUT_HWM, linger_ms=0)
            self.connect(dealer, client.input)
            push = self.ctx.socket(zmq.PUSH)
            set_socket_options(push, receives=False, hwm=OUTPUT_HWM, linger_ms=0)
            self.connect(push, client.output)
            self.dealers.append(dealer)
            self.pushes.append(push)
            self.poller.register(dealer, zmq.POLLIN)
            dealer.send(ready, zmq.NOBLOCK)
        self.watcher.add_clients([client.output for client in welcome.clients])

    def facts(self, backend: EngineBackend, compat: EngineCompat) -> EngineFacts:
        return EngineFacts(
            engine_index=self.index,
            incarnation=self.incarnation,
            compat=compat,
            model=backend.model,
            max_model_len=backend.max_model_len,
            supported_tasks=tuple(backend.supported_tasks),
            num_kv_blocks=backend.num_kv_blocks,
            block_size=backend.block_size,
            max_num_seqs=backend.max_num_seqs,
            vocab_size=backend.vocab_size,
            eos_token_ids=tuple(backend.eos_token_ids),
            device=backend.device,
            dtype=backend.dtype,
            pid=os.getpid(),
            host=socket.gethostname(),
        )

    # -- the loop --------------------------------------------------------------------------------

    def run_loop(self, backend: EngineBackend) -> str:
        """Receive, step, send; until a drain ends (returns the reason for `EngineDead`), a
        signal or an exception."""
        idle_ms = max(1, int(self.config.settings.heartbeat_interval_s * 1000))
        while True:
            if self.drain_signal is not None and self.drain is None:
                self.begin_drain()
            if self.drain is not None and self.drain_over(backend):
                return self.end_drain(backend)
            busy = backend.has_work()
            self.clock.mark_busy(busy)
            idle = idle_ms if self.drain is None else min(idle_ms, _DRAIN_POLL_MS)
            self.drain_input(backend, _BUSY_POLL_MS if busy else idle)
            if not backend.has_work():
                continue
            self.clock.mark_busy(True)
            outputs = backend.step()
            self.clock.mark_step(backend.has_work())
            self.send_outputs(backend, outputs)

    def drain_input(self, backend: EngineBackend, timeout_ms: int) -> None:
        ready = dict(self.poller.poll(timeout_ms))
        if not ready:
            return
        for client, sock in enumerate(self.dealers):
            if sock not in ready:
                continue
            for _ in range(_MAX_MESSAGES_PER_DRAIN):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle_frames(backend, client, frames)
        self.latest_stats = backend.stats()

    def handle_frames(self, backend: EngineBackend, client: int, frames: list[bytes]) -> None:
        if len(frames) != 1:
            logger.warning("dropped a message of %d frames (expected 1)", len(frames))
            return
        try:
            msg = self._decoder.decode(frames[0])
        except BadFrame as e:
            logger.warning("dropped a bad frame of %d bytes: %s", len(frames[0]), e)
            return
        if isinstance(msg, AddRequest):
            self.add_request(backend, client, msg)
        elif isinstance(msg, AbortRequests):
            mine = [rid for rid in msg.request_ids if self.owners.get(rid) == client]
            self.send_outputs(backend, backend.abort_requests(mine))
        elif isinstance(msg, UtilityRequest):
            self.send_to(client, self.call_utility(backend, msg))
        elif isinstance(msg, DrainingAck):
            if self.drain is not None:
                self.drain.acked.add(client)
        elif isinstance(msg, EngineEvicted):
            logger.error("API server %d evicted this engine: %s", client, msg.reason)
            raise _Evicted(f"evicted by API server {client}: {msg.reason}")

    def add_request(self, backend: EngineBackend, client: int, msg: AddRequest) -> None:
        rid = msg.request_id
        try:
            if rid in self.owners:
                raise InvalidRequest(f"request id {rid!r} is already in use")
            backend.add_request(msg)
        except InvalidRequest as e:
            logger.info("request %s refused: %s", rid, e)
            failed = RequestOutput(
                request_id=rid,
                new_token_ids=(),
                finish_reason="error",
                num_prompt_tokens=len(msg.prompt_token_ids),
                error=str(e),
            )
            self.latest_stats = backend.stats()
            self.send_to(client, self.engine_outputs([failed]))
            return
        self.owners[rid] = client

    def call_utility(self, backend: EngineBackend, msg: UtilityRequest) -> UtilityResult:
        def reply(result: UtilityValue = None, error: str | None = None) -> UtilityResult:
            return UtilityResult(
                call_id=msg.call_id, engine_index=self.index, result=result, error=error
            )

        if msg.args:
            return reply(error=f"utility {msg.method!r} takes no arguments")
        if msg.method == "ping":
            return reply("pong")
        if msg.method == "get_supported_tasks":
            return reply(list(backend.supported_tasks))
        if msg.method == "get_stats":
            stats = msgspec.structs.asdict(backend.stats())
            return reply({k: float(v) for k, v in stats.items()})
        if msg.method == "reset_prefix_cache":
            return reply(bool(backend.reset_prefix_cache()))
        return reply(error=f"unknown utility method {msg.method!r}")

    def send_outputs(self, backend: EngineBackend, outputs: Iterable[RequestOutput]) -> None:
        """Send each output to the client that owns its request (one batch per client)."""
        self.latest_stats = backend.stats()
        batches: dict[int, list[RequestOutput]] = {}
        for out in outputs:
            owner = self.owners.get(out.request_id)
            if out.finish_reason is not None:
                self.owners.pop(out.request_id, None)
            if owner is None:
                logger.debug("output for unknown request %s dropped", out.request_id)
                continue
            batches.setdefault(owner, []).append(out)
        for client, batch in batches.items():
            self.send_to(client, self.engine_outputs(batch))

    def engine_outputs(self, outputs: list[RequestOutput]) -> EngineOutputs:
        return EngineOutputs(
            engine_index=self.index,
            incarnation=self.incarnation,
            outputs=tuple(outputs),
            timestamp=time.time(),
            stats=self.latest_stats,
        )

    def send_to(self, client: int, msg: msgspec.Struct) -> None:
        """Send on a client's PUSH; a client that stopped reading loses messages, not us."""
        try:
            self.pushes[client].send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            if client not in self._dropped:
                self._dropped.add(client)
                logger.warning("API server %d is not reading; dropping its outputs", client)

    # -- draining --------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Tell every client and the monitor; the loop goes on until `drain_over`."""
        name, timeout = self.drain_signal or "signal", self.config.drain_timeout_s
        now = time.monotonic()
        self.drain = _Drain(signal_name=name, started=now, deadline=now + timeout)
        logger.info(
            "engine %d draining (%s): %d request(s) in flight, up to %g s",
            self.index,
            name,
            len(self.owners),
            timeout,
        )
        draining = EngineDraining(
            engine_index=self.index, incarnation=self.incarnation, deadline_s=timeout
        )
        for client in range(len(self.pushes)):
            self.send_to(client, draining)
        self.status("draining", f"{name}: up to {timeout:g} s")

    def drain_over(self, backend: EngineBackend) -> bool:
        drain = self.drain
        if drain is None:
            return False
        now = time.monotonic()
        if now >= drain.deadline:
            return True
        if backend.has_work():
            return False
        all_acked = len(drain.acked) >= len(self.pushes)
        return all_acked or now - drain.started >= DRAIN_ACK_WAIT_S

    def end_drain(self, backend: EngineBackend) -> str:
        """Fail what is left (the deadline passed); the reason for `EngineDead`."""
        drain = self.drain
        name = drain.signal_name if drain is not None else "signal"
        left = list(self.owners)
        if left:
            logger.warning(
                "engine %d: drain deadline of %g s passed; failing %d request(s)",
                self.index,
                self.config.drain_timeout_s,
                len(left),
            )
            error = f"{SHUTDOWN_ERROR} (drain deadline of {self.config.drain_timeout_s:g} s)"
            failed = [
                msgspec.structs.replace(out, finish_reason="error", error=error)
                for out in backend.abort_requests(left)
            ]
            self.send_outputs(backend, failed)
        logger.info("engine %d drained; stopping", self.index)
        return f"stopped ({name}, drained)"

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, reason: str, *, clean: bool, tell_head: bool = True) -> None:
        """Say `EngineDead` on every link that exists (once). The watcher stops first (it says
        goodbye to the head when it owns that link), so no Heartbeat follows an EngineDead.
        Without `tell_head` (the head refused us or is gone) the API servers, which live with
        the head, get it with a short linger: they are most likely gone too."""
        if self._finished:
            return
        self._finished = True
        dead = EngineDead(
            engine_index=self.index, incarnation=self.incarnation, reason=reason, clean=clean
        )
        self._watcher_ended = self.watcher.stop(dead if self.welcomed and tell_head else None)
        frame = encode(dead)
        linger_ms = goodbye_linger_ms(clean or not tell_head)
        socks = list(self.pushes)
        if self.coordinator is not None and tell_head:
            socks.append(self.coordinator)
        for sock in socks:
            try:
                sock.send(frame, zmq.NOBLOCK)
                sock.setsockopt(zmq.LINGER, linger_ms)
            except zmq.ZMQError as e:
                logger.debug("EngineDead not sent on a link: %s", e)
        self.status("stopped" if clean else "failed", reason)

    def close(self) -> None:
        if not self._finished:
            self._watcher_ended = self.watcher.stop()
        socks = [*self.dealers, *self.pushes]
        if self.coordinator is not None:
            socks.append(self.coordinator)
        for sock in socks:
            sock.close()
        if self.monitor is not None:
            self.monitor.close(linger=_MONITOR_LINGER_MS)
        if self._watcher_ended:
            self.ctx.term()
        else:
            logger.warning("the watcher thread did not stop; not waiting for undelivered frames")


class _SignalHandler:
    """SIGTERM/SIGINT: the first one starts a drain when the core can drain; otherwise (and
    for the next one) it raises `_Shutdown` in the main thread; later ones are ignored."""

    def __init__(self) -> None:
        self.core: EngineCore | None = None
        self._stopping = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self)
            signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopping or (self.core is not None and self.core.request_drain(name)):
            return
        self._stopping = True
        raise _Shutdown(name)


def _start_and_run(core: EngineCore) -> int:
    """Start-up and the loop; returns the exit code of a failure (the loop never ends else)."""
    rank = core.index
    try:
        backend = core.start()
    except RegistrationFailed as e:  # logged where it happened
        core.finish(str(e), clean=False, tell_head=False)
        return 1
    except ValueError as e:  # a user error (model dir, config, keys): no traceback
        logger.error("engine %d start-up failed: %s", rank, e)
        core.finish(f"start-up failed: {e}", clean=False)
        return 1
    except Exception as e:
        logger.exception("engine %d start-up failed", rank)
        core.finish(f"start-up failed: {type(e).__name__}: {e}", clean=False)
        return 1
    try:
        reason = core.run_loop(backend)
        core.finish(reason, clean=True)
        return 0
    except _Evicted as e:  # logged where it happened
        core.finish(str(e), clean=False)
    except Exception as e:
        logger.exception("engine %d failed", rank)
        core.finish(f"{type(e).__name__}: {e}", clean=False)
    return 1


def run_engine_core(config: EngineCoreConfig) -> int:
    """Run an engine core until it is told to stop (0) or fails (1); returns the exit code."""
    handler = _SignalHandler()
    handler.install()
    if config.parent_pid is not None and config.parent_pid == os.getppid():
        set_parent_death_signal()
    core = handler.core = EngineCore(config)
    try:
        core.watcher.start()
        return _start_and_run(core)
    except _Shutdown as e:
        request = core.watcher.exit_request
        code, reason = (request.code, request.reason) if request else (0, f"stopped ({e})")
        if code == 0:
            logger.info("engine %d stopping: %s", config.engine_index, reason)
        head_gone = request is not None and request.head_gone
        core.finish(reason, clean=code == 0, tell_head=not head_gone)
        return code
    finally:
        with contextlib.suppress(_Shutdown):  # a second signal during clean-up
            core.close()

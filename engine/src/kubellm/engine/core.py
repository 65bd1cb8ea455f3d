"""The EngineCore process: drives one backend and talks to its client over ZeroMQ.

Sockets: a DEALER (routing id = engine index) connected to the client's ROUTER carries
`EngineReady` and then receives requests; a PUSH connected to the client's PULL carries outputs,
utility results and `EngineDead`. A watcher thread owns a second PUSH for `Heartbeat`s (ZMQ
sockets are not thread-safe) and checks that the parent process is still there.

Exit codes: 0 after SIGTERM/SIGINT or the parent's death; 1 after a fatal error (start-up or
loop), with `EngineDead` sent first when the sockets are up.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import msgspec
import zmq

from kubellm.engine.backend import EngineBackend, InvalidRequest
from kubellm.engine.config import ModelConfig
from kubellm.engine.dummy import DummyEngine
from kubellm.engine.model_files import resolve_model
from kubellm.engine.transport import (
    ENGINE_LINGER_MS,
    INPUT_HWM,
    OUTPUT_HWM,
    EngineCoreConfig,
    engine_identity,
    set_socket_options,
)
from kubellm.protocol.codec import BadFrame, client_to_engine_decoder, encode
from kubellm.protocol.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineFacts,
    EngineOutputs,
    EngineReady,
    Heartbeat,
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
"""Messages handled between two steps at most, so a flood of requests cannot starve steps."""

UtilityValue = str | int | float | bool | list[str] | dict[str, float] | None


class _Shutdown(BaseException):
    """Raised by the SIGTERM/SIGINT handler to unwind the main thread for a clean exit."""


class ProgressClock:
    """When the loop last made progress while it had work.

    Written by the main loop, read by the watcher thread (single attribute reads and writes).
    """

    def __init__(self) -> None:
        self._since: float | None = None

    def mark_busy(self, busy: bool) -> None:
        """Idle clears the clock; the idle → busy transition starts it."""
        if not busy:
            self._since = None
        elif self._since is None:
            self._since = time.monotonic()

    def mark_step(self, busy_after: bool) -> None:
        """A step completed: progress now (or idle, if no work is left)."""
        self._since = time.monotonic() if busy_after else None

    def seconds_since_progress(self) -> float:
        since = self._since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)


class Watcher(threading.Thread):
    """Sends heartbeats on its own PUSH socket and ends the process when the parent is gone.

    It keeps beating while the main thread is stuck inside a step, so a client can tell a hung
    engine (growing `seconds_since_progress`) from a dead one (no heartbeats).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        config: EngineCoreConfig,
        clock: ProgressClock,
        stats: Callable[[], SchedulerStats],
    ):
        super().__init__(name="engine-watcher", daemon=True)
        self.ready = threading.Event()
        """Set once EngineReady went out; heartbeats start then."""
        self._stopping = threading.Event()
        self._ctx, self._config, self._clock, self._stats = ctx, config, clock, stats
        self._interval = config.settings.heartbeat_interval_s

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=2.0)

    def run(self) -> None:
        sock = self._ctx.socket(zmq.PUSH)
        set_socket_options(sock, receives=False, hwm=1_000, linger_ms=0)
        sock.connect(self._config.output_address)
        next_beat = 0.0
        try:
            while not self._stopping.wait(min(0.25, self._interval)):
                if self._parent_gone():
                    self._exit_for_parent()
                    return
                now = time.monotonic()
                if self.ready.is_set() and now >= next_beat:
                    self._beat(sock)
                    next_beat = now + self._interval
        finally:
            sock.close(linger=0)

    def _beat(self, sock: zmq.Socket[bytes]) -> None:
        beat = Heartbeat(
            engine_index=self._config.engine_index,
            timestamp=time.time(),
            seconds_since_progress=self._clock.seconds_since_progress(),
            stats=self._stats(),
        )
        try:
            sock.send(encode(beat), zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("heartbeat dropped: the client is not reading")

    def _parent_gone(self) -> bool:
        parent = self._config.parent_pid
        return parent is not None and os.getppid() != parent

    def _exit_for_parent(self) -> None:
        """Stop the main thread through SIGTERM; if it does not stop soon, exit hard."""
        logger.error("parent process %s is gone; engine exiting", self._config.parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        if not self._stopping.wait(1.5):
            logger.error("engine main thread did not stop; exiting hard")
            os._exit(1)


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
    """One engine core: its sockets, its backend and the busy loop."""

    def __init__(self, config: EngineCoreConfig):
        self.config = config
        self.index = config.engine_index
        self.ctx = zmq.Context()
        self.clock = ProgressClock()
        self.latest_stats = SchedulerStats()
        self.input = self.ctx.socket(zmq.DEALER)
        self.output = self.ctx.socket(zmq.PUSH)
        self.watcher = Watcher(self.ctx, config, self.clock, lambda: self.latest_stats)
        self._decoder = client_to_engine_decoder()

    def connect(self) -> None:
        self.input.setsockopt(zmq.IDENTITY, engine_identity(self.index))
        set_socket_options(self.input, receives=True, hwm=INPUT_HWM, linger_ms=0)
        self.input.connect(self.config.input_address)
        set_socket_options(self.output, receives=False, hwm=OUTPUT_HWM, linger_ms=0)
        self.output.connect(self.config.output_address)
        logger.info(
            "engine %d connected: input %s, output %s",
            self.index,
            self.config.input_address,
            self.config.output_address,
        )

    def start_backend(self) -> EngineBackend:
        started = time.monotonic()
        backend = build_backend(self.config.settings)
        self.latest_stats = backend.stats()
        facts = self.facts(backend)
        self.input.send(encode(EngineReady(facts=facts)))
        self.watcher.ready.set()
        logger.info(
            "engine %d ready in %.1f s: model %s, max_model_len %d, %d KV blocks of %d, %s/%s",
            self.index,
            time.monotonic() - started,
            facts.model,
            facts.max_model_len,
            facts.num_kv_blocks,
            facts.block_size,
            facts.device,
            facts.dtype,
        )
        return backend

    def facts(self, backend: EngineBackend) -> EngineFacts:
        return EngineFacts(
            engine_index=self.index,
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
        )

    def run_loop(self, backend: EngineBackend) -> None:
        """Receive, step, send; forever (until a signal or an exception)."""
        idle_ms = max(1, int(self.config.settings.heartbeat_interval_s * 1000))
        while True:
            busy = backend.has_work()
            self.clock.mark_busy(busy)
            self.drain_input(backend, _BUSY_POLL_MS if busy else idle_ms)
            if not backend.has_work():
                continue
            self.clock.mark_busy(True)
            outputs = backend.step()
            self.clock.mark_step(backend.has_work())
            self.send_outputs(backend, outputs)

    def drain_input(self, backend: EngineBackend, timeout_ms: int) -> None:
        sock = self.input
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return
        for _ in range(_MAX_MESSAGES_PER_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle_frames(backend, frames)
        self.latest_stats = backend.stats()

    def handle_frames(self, backend: EngineBackend, frames: list[bytes]) -> None:
        if len(frames) != 1:
            logger.warning("dropped a message of %d frames (expected 1)", len(frames))
            return
        try:
            msg = self._decoder.decode(frames[0])
        except BadFrame as e:
            logger.warning("dropped a bad frame of %d bytes: %s", len(frames[0]), e)
            return
        if isinstance(msg, AddRequest):
            self.add_request(backend, msg)
        elif isinstance(msg, AbortRequests):
            self.send_outputs(backend, backend.abort_requests(msg.request_ids))
        elif isinstance(msg, UtilityRequest):
            self.send(self.call_utility(backend, msg))

    def add_request(self, backend: EngineBackend, msg: AddRequest) -> None:
        try:
            backend.add_request(msg)
        except InvalidRequest as e:
            logger.info("request %s refused: %s", msg.request_id, e)
            failed = RequestOutput(
                request_id=msg.request_id,
                new_token_ids=(),
                finish_reason="error",
                num_prompt_tokens=len(msg.prompt_token_ids),
                error=str(e),
            )
            self.send_outputs(backend, [failed])

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

    def send_outputs(self, backend: EngineBackend, outputs: list[RequestOutput]) -> None:
        self.latest_stats = backend.stats()
        if outputs:
            self.send(
                EngineOutputs(
                    engine_index=self.index,
                    outputs=tuple(outputs),
                    timestamp=time.time(),
                    stats=self.latest_stats,
                )
            )

    def send(self, msg: msgspec.Struct) -> None:
        self.output.send(encode(msg))

    def send_dead(self, reason: str) -> None:
        """Best effort: queue EngineDead and let close() linger so that it gets delivered."""
        try:
            self.output.send(
                encode(EngineDead(engine_index=self.index, reason=reason)), zmq.NOBLOCK
            )
            self.output.setsockopt(zmq.LINGER, ENGINE_LINGER_MS)
        except zmq.ZMQError as e:
            logger.warning("could not send EngineDead: %s", e)

    def close(self) -> None:
        self.watcher.stop()
        self.input.close()
        self.output.close()
        self.ctx.term()


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise _Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _set_parent_death_signal() -> None:
    """Linux: have the kernel send SIGTERM when the parent exits (the watcher is the fallback).

    The kernel ties this to the parent *thread* that spawned us, so the API server must spawn
    the engine from a thread that lives as long as it does (its event loop thread).
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logger.debug("prctl unavailable: %s", e)


def run_engine_core(config: EngineCoreConfig) -> int:
    """Run an engine core until it is told to stop (0) or fails (1); returns the exit code."""
    _install_signal_handlers()
    if config.parent_pid is not None and config.parent_pid == os.getppid():
        _set_parent_death_signal()
    core = EngineCore(config)
    try:
        core.watcher.start()
        try:
            core.connect()
            backend = core.start_backend()
        except ValueError as e:  # a user error (model dir, config, sizes): no traceback
            logger.error("engine %d start-up failed: %s", config.engine_index, e)
            core.send_dead(f"start-up failed: {e}")
            return 1
        except Exception as e:
            logger.exception("engine %d start-up failed", config.engine_index)
            core.send_dead(f"start-up failed: {type(e).__name__}: {e}")
            return 1
        try:
            core.run_loop(backend)
        except Exception as e:
            logger.exception("engine %d failed", config.engine_index)
            core.send_dead(f"{type(e).__name__}: {e}")
            return 1
    except _Shutdown as e:
        logger.info("engine %d stopping on %s", config.engine_index, e)
        return 0
    finally:
        with contextlib.suppress(_Shutdown):  # a second signal during clean-up
            core.close()
    return 0  # unreachable: run_loop only ends by an exception

"""`EngineClient`: the API server's asyncio link to its engine-core process.

    async with EngineClient.start(settings, stats_sink) as client:
        async for out in client.generate(request_id, prompt_token_ids, sampling, time.time()):
            ...

Start-up binds a ROUTER (input) and a PULL (output) on ipc:// sockets in a private temp dir,
spawns `kubellm-engine` in its own process group, and waits for `EngineReady`. Then an output
task dispatches engine messages to per-request queues, and a monitor task declares the engine
dead when its process exits, its heartbeats stop, it makes no progress, or it says `EngineDead`.
Death fails every pending request and utility call with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType

import zmq
import zmq.asyncio

from kubellm.engine.transport import (
    INPUT_HWM,
    OUTPUT_HWM,
    EngineCoreConfig,
    engine_identity,
    set_socket_options,
)
from kubellm.protocol.codec import BadFrame, encode, engine_to_client_decoder
from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineFacts,
    EngineOutputs,
    EngineReady,
    EngineToClient,
    Heartbeat,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    UtilityRequest,
    UtilityResult,
)
from kubellm.protocol.settings import ServeSettings
from kubellm.server.errors import EngineDeadError, EngineGenerateError, EngineStartupError
from kubellm.server.stats import RequestStats, StatsSink

logger = logging.getLogger(__name__)

UtilityArg = str | int | float | bool | None
UtilityValue = str | int | float | bool | list[str] | dict[str, float] | None

_MONITOR_INTERVAL_S = 0.1
_LOOP_STALL_S = 1.0
"""A monitor tick later than this means the event loop itself was blocked: heartbeats may be
queued unread, so the heartbeat check waits one more tick."""
_KILL_WAIT_S = 5.0


def engine_command() -> list[str]:
    """The `kubellm-engine` console script of this Python environment (or `python -m`)."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(folder) / "kubellm-engine"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return [sys.executable, "-m", "kubellm.engine.cli"]


class EngineClient:
    """Spawns, watches and talks to one engine core. Use it through `EngineClient.start`."""

    def __init__(self, settings: ServeSettings, stats: StatsSink):
        self.settings = settings
        self._frontend = settings.frontend
        self._sink = stats
        self._ctx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.ROUTER)
        self._output = self._ctx.socket(zmq.PULL)
        self._identity = engine_identity(0)
        self._decoder = engine_to_client_decoder()
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._facts: EngineFacts | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | EngineDeadError]] = {}
        self._utility: dict[int, asyncio.Future[UtilityValue]] = {}
        self._call_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._dead_error: EngineDeadError | None = None
        self._last_heartbeat = time.monotonic()
        self._closed = False

    @classmethod
    def start(cls, settings: ServeSettings, stats: StatsSink) -> EngineClient:
        """An async context manager: entering it starts the engine, leaving it shuts it down."""
        return cls(settings, stats)

    async def __aenter__(self) -> EngineClient:
        try:
            await self._start()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- public state -------------------------------------------------------------------------

    @property
    def facts(self) -> EngineFacts:
        if self._facts is None:
            raise RuntimeError("the engine client is not started")
        return self._facts

    @property
    def errored(self) -> bool:
        return self._dead_error is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead_error

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def in_flight_request_ids(self) -> list[str]:
        """Ids of the requests whose streams are open (for draining at shutdown)."""
        return list(self._queues)

    async def check_health(self) -> None:
        """Raises EngineDeadError when the engine is dead (a fresh one each call, so that
        repeated health checks do not grow one exception's traceback)."""
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error))

    # -- start-up -----------------------------------------------------------------------------

    async def _start(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="kubellm-")
        input_address = f"ipc://{self._tmpdir}/input"
        output_address = f"ipc://{self._tmpdir}/output"
        self._input.setsockopt(zmq.ROUTER_MANDATORY, 1)
        set_socket_options(self._input, receives=True, hwm=INPUT_HWM, linger_ms=0)
        set_socket_options(self._output, receives=True, hwm=OUTPUT_HWM, linger_ms=0)
        self._input.bind(input_address)
        self._output.bind(output_address)
        config = EngineCoreConfig(
            settings=self.settings.engine,
            input_address=input_address,
            output_address=output_address,
            engine_index=0,
            parent_pid=os.getpid(),
        )
        command = [*engine_command(), "--config-json", config.model_dump_json()]
        # Own process group: a terminal Ctrl-C reaches the server only, which then stops the
        # engine in order; the engine's parent-death check covers a server that dies abruptly.
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
        timeout = self._frontend.engine_ready_timeout_s
        logger.info(
            "started engine process %d (backend %s); waiting up to %.0f s for it to be ready",
            self._proc.pid,
            self.settings.engine.engine_backend,
            timeout,
        )
        started = time.monotonic()
        self._facts = await self._wait_ready(self._proc, timeout)
        logger.info(
            "engine ready after %.1f s: model %s, max_model_len %d, tasks %s",
            time.monotonic() - started,
            self._facts.model,
            self._facts.max_model_len,
            ",".join(self._facts.supported_tasks),
        )
        self._last_heartbeat = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._output_loop(), name="engine-output"),
            asyncio.create_task(self._monitor_loop(), name="engine-monitor"),
        ]

    async def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> EngineFacts:
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                reason = await self._startup_dead_reason()
                detail = f": {reason}" if reason else " (see the engine log above)"
                raise EngineStartupError(f"engine exited with code {code} during start-up{detail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                raise EngineStartupError(f"engine was not ready within {timeout:g} s")
            if not await self._input.poll(int(min(0.1, remaining) * 1000) + 1):
                continue
            frames = await self._input.recv_multipart()
            msg = self._decode(frames[-1]) if len(frames) == 2 else None
            if isinstance(msg, EngineReady):
                return self._check_facts(msg.facts)
            logger.warning("ignored an unexpected message during start-up: %r", msg)

    async def _startup_dead_reason(self) -> str | None:
        """The EngineDead reason the engine sent before exiting, if it did."""
        while await self._output.poll(200):
            msg = self._decode(await self._output.recv())
            if isinstance(msg, EngineDead):
                return msg.reason
        return None

    def _check_facts(self, facts: EngineFacts) -> EngineFacts:
        if facts.protocol_version != PROTOCOL_VERSION:
            raise EngineStartupError(
                f"engine speaks protocol version {facts.protocol_version}, "
                f"this server speaks {PROTOCOL_VERSION}"
            )
        return facts

    def _decode(self, frame: bytes) -> EngineToClient | None:
        try:
            return self._decoder.decode(frame)
        except BadFrame as e:
            logger.warning("dropped a bad frame from the engine: %s", e)
            return None

    # -- background tasks ---------------------------------------------------------------------

    async def _output_loop(self) -> None:
        try:
            while True:
                msg = self._decode(await self._output.recv())
                if msg is not None:
                    self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("engine output handler failed")
            self._declare_dead(f"output handler failed: {e}")

    def _dispatch(self, msg: EngineToClient) -> None:
        if isinstance(msg, EngineOutputs):
            for out in msg.outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            if msg.stats is not None:
                self._record_engine_stats(msg.engine_index, msg.stats)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, UtilityResult):
            future = self._utility.pop(msg.call_id, None)
            if future is None or future.done():
                return
            if msg.error is not None:
                future.set_exception(EngineGenerateError(f"engine utility failed: {msg.error}"))
            else:
                future.set_result(msg.result)
        elif isinstance(msg, EngineDead):
            self._declare_dead(f"the engine reported a fatal error: {msg.reason}")
        else:
            logger.warning("ignored an unexpected %s from the engine", type(msg).__name__)

    def _on_heartbeat(self, beat: Heartbeat) -> None:
        self._last_heartbeat = time.monotonic()
        self._record_engine_stats(beat.engine_index, beat.stats)
        limit = self._frontend.engine_progress_timeout_s
        if beat.seconds_since_progress > limit:
            self._declare_dead(
                f"no progress for {beat.seconds_since_progress:.1f} s while it had work "
                f"(limit {limit:g} s)"
            )

    async def _monitor_loop(self) -> None:
        proc = self._proc
        last_tick = time.monotonic()
        limit = self._frontend.engine_heartbeat_timeout_s
        while self._dead_error is None and proc is not None:
            await asyncio.sleep(_MONITOR_INTERVAL_S)
            now = time.monotonic()
            stalled, last_tick = now - last_tick > _LOOP_STALL_S, now
            code = proc.poll()
            if code is not None:
                self._declare_dead(f"the engine process exited with code {code}")
            elif not stalled and now - self._last_heartbeat > limit:
                self._declare_dead(f"no heartbeat from the engine for {limit:g} s")

    def _declare_dead(self, reason: str) -> None:
        if self._dead_error is not None or self._closed:
            return
        logger.error("engine core is dead: %s", reason)
        self._dead_error = EngineDeadError(f"engine core died: {reason}")
        self._fail_pending(self._dead_error)

    def _fail_pending(self, error: EngineDeadError) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)
        for future in self._utility.values():
            if not future.done():
                future.set_exception(EngineDeadError(str(error)))
        self._utility.clear()

    def _record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None:
        try:
            self._sink.record_engine_stats(engine_index, stats)
        except Exception:
            logger.exception("stats sink failed on engine stats")

    # -- requests -----------------------------------------------------------------------------

    def _ensure_usable(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error))
        if self._closed:
            raise EngineDeadError("the engine client is shut down")

    async def _send(self, msg: AddRequest | AbortRequests | UtilityRequest) -> None:
        self._ensure_usable()
        try:
            await self._input.send_multipart([self._identity, encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._declare_dead("its input socket is disconnected")
            raise EngineDeadError(str(self._dead_error)) from e

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        arrival_time: float,
        stats: RequestStats | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (deltas) until one carries a finish_reason.

        Raises EngineDeadError (engine gone) or EngineGenerateError (this request failed).
        Closing or cancelling the consumer aborts the request in the engine.
        """
        self._ensure_usable()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        rs = stats if stats is not None else RequestStats(arrival_time=arrival_time)
        rs.num_prompt_tokens = len(prompt_token_ids)
        rs.max_tokens_param = sampling.max_tokens
        queue: asyncio.Queue[RequestOutput | EngineDeadError] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            request = AddRequest(
                request_id=request_id,
                prompt_token_ids=tuple(prompt_token_ids),
                sampling=sampling,
                arrival_time=arrival_time,
            )
            await self._send(request)
            while not finished:
                item = await queue.get()
                if isinstance(item, EngineDeadError):
                    raise EngineDeadError(str(item))
                _update_stats(rs, item)
                finished = item.finish_reason is not None
                if item.finish_reason == "error":
                    raise EngineGenerateError(
                        item.error or f"the engine failed request {request_id}"
                    )
                yield item
        except EngineDeadError:
            rs.finish_reason = "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                # The consumer may have finished it ("stop": a stop string matched).
                rs.finish_reason = rs.finish_reason or "abort"
                self._abort_in_background(request_id)
            raise
        finally:
            self._queues.pop(request_id, None)
            rs.finish_time = time.time()
            self._record_request(rs)

    def _abort_in_background(self, request_id: str) -> None:
        if self._dead_error is not None or self._closed:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.abort([request_id]))
        except RuntimeError:  # no running loop: the generator is finalised at shutdown
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_request(self, stats: RequestStats) -> None:
        try:
            self._sink.record_request(stats)
        except Exception:
            logger.exception("stats sink failed on a request")

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Stop these requests in the engine; their streams end with finish_reason "abort"."""
        if not request_ids or self._dead_error is not None or self._closed:
            return
        await self._send(AbortRequests(request_ids=tuple(request_ids)))

    async def call_utility(
        self, method: str, *args: UtilityArg, timeout: float = 30.0
    ) -> UtilityValue:
        """Call an engine utility ("ping", "get_supported_tasks", "get_stats", ...)."""
        self._ensure_usable()
        call_id = next(self._call_ids)
        future: asyncio.Future[UtilityValue] = asyncio.get_running_loop().create_future()
        self._utility[call_id] = future
        try:
            await self._send(UtilityRequest(call_id=call_id, method=method, args=tuple(args)))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"engine utility {method!r} got no answer within {timeout:g} s"
            ) from None
        finally:
            self._utility.pop(call_id, None)

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after `timeout`) and release everything.

        Safe to call more than once. Pending requests fail with EngineDeadError.
        """
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A dead engine needs no graceful stop: it may be hung or stopped.
        await self._stop_process(min(timeout, 1.0) if self.errored else timeout)
        self._fail_pending(EngineDeadError("the engine client is shut down"))
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _stop_process(self, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        if not await _wait_exit(proc, timeout):
            logger.warning(
                "engine %d did not exit %.1f s after SIGTERM; killing it", proc.pid, timeout
            )
            proc.kill()
            if not await _wait_exit(proc, _KILL_WAIT_S):
                logger.error("engine %d did not exit after SIGKILL", proc.pid)
                return
        logger.info("engine process %d exited with code %s", proc.pid, proc.returncode)


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _update_stats(stats: RequestStats, out: RequestOutput) -> None:
    now = time.time()
    if out.new_token_ids:
        if stats.first_token_time is None:
            stats.first_token_time = now
        elif stats.last_token_time is not None:
            stats.inter_token_latencies.append(now - stats.last_token_time)
        stats.last_token_time = now
        stats.num_generation_tokens += len(out.new_token_ids)
    if out.num_cached_tokens:
        stats.num_cached_tokens = out.num_cached_tokens
    if out.finish_reason is not None:
        stats.finish_reason = out.finish_reason

"""The engine core's watcher thread: heartbeats, the head's liveness and the parent's.

ZMQ sockets are not thread-safe, so the watcher owns its sockets: one PUSH per client for
`Heartbeat`s, one PUSH to the local monitor, and the coordinator DEALER, which the main thread
hands over after the `EngineWelcome` (`adopt_coordinator`) and never touches again. The main
thread asks for the final `EngineDead` on the coordinator link through `stop(farewell)`.

When the head stops sending `HeadBeat`s, or the parent process disappears, the watcher records
why (`exit_request`) and sends SIGTERM to its own process, so that the main thread unwinds and
says goodbye on every link; if it does not stop soon, the watcher exits hard.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from kubellm.engine.transport import EngineCoreConfig, goodbye_linger_ms, set_socket_options
from kubellm.protocol.codec import BadFrame, coordinator_to_engine_decoder, encode
from kubellm.protocol.messages import EngineDead, EngineRefused, Heartbeat, SchedulerStats

logger = logging.getLogger(__name__)

HARD_EXIT_AFTER_S = 1.5
"""How long the watcher waits for the main thread to stop before it calls os._exit(1)."""
_BEAT_HWM = 1_000

Connector = Callable[[zmq.Socket[bytes], str], None]
"""Connects a socket to an address (applying CURVE when configured)."""


@dataclass(frozen=True)
class ExitRequest:
    """Why the watcher ended the process: its exit code and the reason for `EngineDead`."""

    code: int
    reason: str
    head_gone: bool = False
    """The head is unreachable: there is nobody to say goodbye to (and lingering on its
    sockets would only delay the exit)."""


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
    """Beats on every link, watches the head and the parent, and ends the process for them.

    It keeps beating while the main thread is stuck inside a step (or loading the model), so a
    client can tell a hung engine (growing `seconds_since_progress`) from a dead one.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        config: EngineCoreConfig,
        incarnation: int,
        clock: ProgressClock,
        stats: Callable[[], SchedulerStats],
        connect: Connector,
    ):
        super().__init__(name="engine-watcher", daemon=True)
        self.exit_request: ExitRequest | None = None
        """Set (before the SIGTERM to this process) when the watcher ends the process."""
        self._ctx, self._config, self._clock, self._stats = ctx, config, clock, stats
        self._incarnation, self._connect = incarnation, connect
        self._interval = config.settings.heartbeat_interval_s
        self._handover: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._farewell: EngineDead | None = None
        self._coordinator: zmq.Socket[bytes] | None = None
        self._last_head = 0.0
        self._beat_socks: list[zmq.Socket[bytes]] = []
        self._decoder = coordinator_to_engine_decoder()

    # -- called by the main thread -------------------------------------------------------------

    def adopt_coordinator(self, sock: zmq.Socket[bytes]) -> None:
        """Take over the coordinator DEALER (the main thread must not use it any more)."""
        self._handover.put(("coordinator", sock))

    def add_clients(self, output_addresses: list[str]) -> None:
        """Start beating to these clients' PULL sockets (once the engine is ready)."""
        self._handover.put(("clients", output_addresses))

    def stop(self, farewell: EngineDead | None = None) -> bool:
        """Stop the thread, sending `farewell` to the coordinator first; True once it ended."""
        if farewell is not None:
            self._farewell = farewell
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=2.0)
        return not self.is_alive()

    # -- the thread ------------------------------------------------------------------------------

    def run(self) -> None:
        if self._config.monitor_address:
            self._beat_socks.append(self._push(self._config.monitor_address, curve=False))
        tick = min(0.25, self._interval)
        next_beat = 0.0
        try:
            while not self._stopping.is_set():
                self._take_handovers()
                if self._check_parent() or self._check_head():
                    return
                now = time.monotonic()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self._interval
                self._wait(min(tick, max(0.0, next_beat - time.monotonic())))
        finally:
            self._take_handovers()
            self._close()

    def _take_handovers(self) -> None:
        while True:
            try:
                kind, payload = self._handover.get_nowait()
            except queue.Empty:
                return
            if kind == "coordinator":
                self._coordinator = payload
                self._last_head = time.monotonic()
            else:
                self._beat_socks += [self._push(address, curve=True) for address in payload]

    def _push(self, address: str, *, curve: bool) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.PUSH)
        set_socket_options(sock, receives=False, hwm=_BEAT_HWM, linger_ms=0)
        if curve:
            self._connect(sock, address)
        else:
            sock.connect(address)
        return sock

    def _beat(self) -> None:
        frame = encode(
            Heartbeat(
                engine_index=self._config.engine_index,
                incarnation=self._incarnation,
                timestamp=time.time(),
                seconds_since_progress=self._clock.seconds_since_progress(),
                stats=self._stats(),
            )
        )
        socks = (
            self._beat_socks
            if self._coordinator is None
            else [*self._beat_socks, self._coordinator]
        )
        for sock in socks:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                logger.debug("heartbeat dropped: a peer is not reading")

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, reading the coordinator link meanwhile."""
        sock = self._coordinator
        if sock is None:
            self._stopping.wait(seconds)
            return
        if not sock.poll(int(seconds * 1000), zmq.POLLIN):
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_head_message(frames)

    def _on_head_message(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            logger.warning("dropped a head message of %d frames (expected 1)", len(frames))
            return
        try:
            msg = self._decoder.decode(frames[0])
        except BadFrame as e:
            logger.warning("dropped a bad frame of %d bytes from the head: %s", len(frames[0]), e)
            return
        self._last_head = time.monotonic()
        if isinstance(msg, EngineRefused):
            reason = f"the head at {self._config.coordinator_address} refused engine "
            reason += f"{self._config.engine_index}: {msg.reason}"
            logger.error("%s", reason)
            self._end_process(ExitRequest(1, reason))

    def _check_parent(self) -> bool:
        parent = self._config.parent_pid
        if parent is None or os.getppid() == parent:
            return False
        logger.error("parent process %s is gone; engine exiting", parent)
        self._end_process(ExitRequest(0, f"stopped (parent process {parent} is gone)"))
        return True

    def _check_head(self) -> bool:
        timeout = self._config.head_timeout_s
        if self._coordinator is None or time.monotonic() - self._last_head <= timeout:
            return False
        address = self._config.coordinator_address
        logger.error("the head at %s is gone (no HeadBeat for %g s); exiting", address, timeout)
        self._end_process(ExitRequest(1, f"the head at {address} is gone", head_gone=True))
        return True

    def _end_process(self, request: ExitRequest) -> None:
        """Stop the main thread through SIGTERM; if it does not stop soon, exit hard."""
        if self.exit_request is None:
            self.exit_request = request
        os.kill(os.getpid(), signal.SIGTERM)
        if not self._stopping.wait(HARD_EXIT_AFTER_S):
            logger.error("engine main thread did not stop; exiting hard")
            os._exit(1)

    def _close(self) -> None:
        coordinator, farewell = self._coordinator, self._farewell
        if coordinator is not None:
            if farewell is not None:
                try:
                    coordinator.send(encode(farewell), zmq.NOBLOCK)
                    coordinator.setsockopt(zmq.LINGER, goodbye_linger_ms(farewell.clean))
                except zmq.ZMQError as e:
                    logger.debug("EngineDead to the head not sent: %s", e)
            coordinator.close()
        for sock in self._beat_socks:
            sock.close(linger=0)

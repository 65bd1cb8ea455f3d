"""`Coordinator`: the head's engine registry, a thread with a ZeroMQ ROUTER.

Engines dial it with a DEALER (routing id `engine_identity(rank, incarnation)`) and repeat
`EngineHello` until answered (docs/design/0003-scale-out.md, "Registration"). The coordinator
refuses a rank outside 0..D-1, a mismatching `EngineCompat`, or a rank held by another live
incarnation; otherwise it welcomes the engine with the API servers' addresses and from then on
sends it a `HeadBeat` every heartbeat interval. A rank is free again when its holder says
`EngineDead`, its connection drops, or it is silent for the engine timeout.

Connection drops: `zmq.ROUTER_NOTIFY` is a draft option that the libzmq bundled with pyzmq
(4.3) is built without, so the coordinator watches its ROUTER with a socket monitor instead.
A DISCONNECTED event carries the connection's file descriptor, which is matched to a holder
through the `zmq.SRCFD` property of the holder's frames. Closed descriptors are mapped to
holders before any further frame is read (so a descriptor that a new connection reuses is not
confused with the old one), and released after the frames already queued (an engine's last
`EngineDead` is read first). A connection that closes before its Hello is read leaves a
holder that only the silence timeout releases.

The sockets are used only by the coordinator's thread (after `start` bound them); `holders`
takes a lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from kubellm.engine.transport import (
    INPUT_HWM,
    compat_mismatches,
    curve_allowed_clients,
    curve_server,
    engine_identity,
    parse_engine_identity,
    set_socket_options,
)
from kubellm.protocol.codec import BadFrame, encode, engine_to_coordinator_decoder
from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    EngineCompat,
    EngineDead,
    EngineHello,
    EngineRefused,
    EngineWelcome,
    HeadBeat,
    Heartbeat,
)
from kubellm.server.head import HeadPlan

logger = logging.getLogger(__name__)

_MAX_POLL_S = 0.1
"""Longest wait for a frame, so that `stop` is noticed promptly."""
_MAX_BATCH = 256
"""Most frames handled in one go, so that HeadBeats and timeouts are not starved."""


@dataclass(frozen=True)
class EngineHolder:
    """The engine incarnation that holds a rank. Times are `time.monotonic()` values."""

    rank: int
    incarnation: int
    pid: int
    host: str
    registered_at: float
    last_seen: float
    """When the holder last sent `EngineHello` or `Heartbeat`."""

    @property
    def identity(self) -> bytes:
        return engine_identity(self.rank, self.incarnation)


class Coordinator:
    """Registers engines and beats towards them; see the module docstring."""

    def __init__(
        self,
        plan: HeadPlan,
        compat: EngineCompat,
        *,
        data_parallel_size: int,
        heartbeat_interval_s: float,
        engine_timeout_s: float,
        curve_dir: str | None = None,
    ):
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
        if heartbeat_interval_s <= 0 or engine_timeout_s <= 0:
            raise ValueError("heartbeat_interval_s and engine_timeout_s must be positive")
        self._plan = plan
        self._compat = compat
        self._size = data_parallel_size
        self._interval = heartbeat_interval_s
        self._timeout = engine_timeout_s
        self._curve_dir = curve_dir
        self._decoder = engine_to_coordinator_decoder()
        self._goodbyes: dict[int, str] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._auth: ThreadAuthenticator | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._holders: dict[int, EngineHolder] = {}
        self._warned_unknown: set[bytes] = set()
        self._fds: dict[bytes, int] = {}
        """identity → file descriptor of its connection, for the holders (thread only)."""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the ROUTER (in the caller's thread), then serve it in a daemon thread.

        Raises ValueError when the address cannot be bound or the CURVE keys are missing."""
        if self._ctx is not None or self._stopping.is_set():
            raise RuntimeError("a coordinator can be started only once")
        self._ctx = zmq.Context()
        try:
            self._sock = self._bind(self._ctx)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._run, name="kubellm-coordinator", daemon=True)
        self._thread.start()
        logger.info(
            "coordinator listening on %s for %d engine(s)%s",
            self._plan.coordinator_bind,
            self._size,
            " (CURVE)" if self._curve_dir else "",
        )

    def _bind(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.IPV6, 1)  # dual stack: needed to bind an IPv6 address
            set_socket_options(sock, receives=True, hwm=INPUT_HWM, linger_ms=0)
            if self._curve_dir is not None:
                allowed = curve_allowed_clients(self._curve_dir)
                curve_server(sock, self._curve_dir)
                self._auth = ThreadAuthenticator(ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(allowed))
            address = self._plan.coordinator_bind
            try:
                sock.bind(address)
            except zmq.ZMQError as e:
                raise ValueError(f"cannot bind the coordinator on {address}: {e}") from e
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def stop(self) -> None:
        """Stop the thread, close the socket and the context; safe to call more than once."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def holders(self) -> dict[int, EngineHolder]:
        """A snapshot of rank → holder of the registered engines."""
        with self._lock:
            return dict(self._holders)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        sock, monitor = self._sock, self._monitor
        if sock is None or monitor is None:
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        next_beat = time.monotonic() + self._interval
        try:
            while not self._stopping.is_set():
                wait = min(_MAX_POLL_S, max(0.0, next_beat - time.monotonic()))
                ready = dict(poller.poll(int(wait * 1000) + 1))
                gone = self._disconnected(monitor)
                if sock in ready or gone:
                    self._receive(sock)
                self._release_disconnected(gone)
                now = time.monotonic()
                self._expire_silent(now)
                if now >= next_beat:
                    self._beat(sock)
                    next_beat = now + self._interval
        except Exception:
            logger.exception("the coordinator thread failed; engines will time out")

    def _disconnected(self, monitor: zmq.Socket[Any]) -> set[bytes]:
        """The holder identities whose connections the monitor reports closed. They are
        resolved before any further frame is read, so a reused descriptor cannot be mistaken
        for a holder that registers later."""
        gone = set()
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fd = int(event["value"])
                gone |= {identity for identity, f in self._fds.items() if f == fd}
        return gone

    def _release_disconnected(self, gone: set[bytes]) -> None:
        """Release the holders of closed connections, after their last frames were read (an
        `EngineDead` may have released them already)."""
        for identity in gone:
            holder = self._holder_of(identity)
            if holder is not None:
                logger.warning("engine rank %d disconnected from the coordinator", holder.rank)
                self._release(holder)

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        """Handle the frames queued on the ROUTER (at most _MAX_BATCH)."""
        for _ in range(_MAX_BATCH):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                logger.warning("dropped a message of %d frames on the coordinator", len(frames))
                continue
            identity, payload = frames[0].bytes, frames[1]
            reply = self._handle(identity, payload.bytes)
            if self._holder_of(identity) is not None:
                self._fds[identity] = int(payload.get(zmq.SRCFD))
            if reply is not None:
                _send(sock, identity, encode(reply))

    def _handle(self, identity: bytes, payload: bytes) -> EngineWelcome | EngineRefused | None:
        """Act on one frame from `identity`; returns the answer to send, if any."""
        try:
            msg = self._decoder.decode(payload)
        except BadFrame as e:
            logger.warning("undecodable registration frame from %s: %s", identity.hex(), e)
            return EngineRefused(
                f"cannot decode your registration (this head speaks protocol "
                f"{PROTOCOL_VERSION}): {e}"
            )
        if isinstance(msg, EngineHello):
            return self._on_hello(identity, msg)
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(identity)
        elif isinstance(msg, EngineDead):
            self._on_dead(identity, msg)
        return None

    # -- message handlers ---------------------------------------------------------------------

    def _on_hello(self, identity: bytes, hello: EngineHello) -> EngineWelcome | EngineRefused:
        now = time.monotonic()
        self._expire_silent(now)
        reason = self._refusal(identity, hello)
        if reason is not None:
            logger.error(
                "refused engine rank %d (incarnation %016x, host %s, pid %d): %s",
                hello.engine_index,
                hello.incarnation,
                hello.host,
                hello.pid,
                reason,
            )
            return EngineRefused(reason)
        rank = hello.engine_index
        with self._lock:
            current = self._holders.get(rank)
            if current is not None:  # the same incarnation again (else _refusal refused it)
                self._holders[rank] = dataclasses.replace(current, last_seen=now)
            else:
                self._holders[rank] = EngineHolder(
                    rank, hello.incarnation, hello.pid, hello.host, now, now
                )
        if current is None:
            logger.info(
                "registered engine rank %d (incarnation %016x) on host %s, pid %d",
                rank,
                hello.incarnation,
                hello.host,
                hello.pid,
            )
        return EngineWelcome(
            clients=self._plan.clients_connect, heartbeat_interval_s=self._interval
        )

    def _refusal(self, identity: bytes, hello: EngineHello) -> str | None:
        """Why this Hello is refused, or None when it is accepted."""
        rank = hello.engine_index
        if not 0 <= rank < self._size:
            return f"rank {rank} is outside 0..{self._size - 1} (--data-parallel-size {self._size})"
        mismatches = compat_mismatches(self._compat, hello.compat)
        if mismatches:
            return "incompatible with this head: " + "; ".join(mismatches)
        if parse_engine_identity(identity) != (rank, hello.incarnation):
            return "the connection's routing id does not match the rank and incarnation"
        holder = self.holders().get(rank)
        if holder is not None and holder.incarnation != hello.incarnation:
            return (
                f"rank {rank} is held by a live engine (incarnation {holder.incarnation:016x} "
                f"on host {holder.host}, pid {holder.pid})"
            )
        return None

    def _on_heartbeat(self, identity: bytes) -> None:
        holder = self._holder_of(identity)
        if holder is None:
            if identity not in self._warned_unknown and len(self._warned_unknown) < 1024:
                self._warned_unknown.add(identity)
                logger.warning("ignored heartbeats of unregistered engine %s", identity.hex())
            return
        with self._lock:
            self._holders[holder.rank] = dataclasses.replace(holder, last_seen=time.monotonic())

    def goodbye_reason(self, rank: int) -> str | None:
        """The reason in the last `EngineDead` a holder of `rank` sent (e.g. why its model
        failed to load: API servers hear nothing from an engine before it is ready)."""
        with self._lock:
            return self._goodbyes.get(rank)

    def _on_dead(self, identity: bytes, dead: EngineDead) -> None:
        holder = self._holder_of(identity)
        if holder is not None:
            with self._lock:
                self._goodbyes[holder.rank] = dead.reason
            level = logging.INFO if dead.clean else logging.WARNING
            logger.log(level, "engine rank %d said goodbye: %s", holder.rank, dead.reason)
            self._release(holder)

    # -- holders ------------------------------------------------------------------------------

    def _holder_of(self, identity: bytes) -> EngineHolder | None:
        parsed = parse_engine_identity(identity)
        if parsed is None:
            return None
        with self._lock:
            holder = self._holders.get(parsed[0])
        return holder if holder is not None and holder.incarnation == parsed[1] else None

    def _release(self, holder: EngineHolder) -> None:
        """Free the holder's rank (the handlers run in the coordinator thread only, so the
        rank is still this holder's)."""
        with self._lock:
            self._holders.pop(holder.rank, None)
        self._fds.pop(holder.identity, None)
        logger.info("rank %d is free again", holder.rank)

    def _expire_silent(self, now: float) -> None:
        for holder in self.holders().values():
            if now - holder.last_seen > self._timeout:
                logger.warning(
                    "engine rank %d (incarnation %016x) was silent for %g s; releasing it",
                    holder.rank,
                    holder.incarnation,
                    self._timeout,
                )
                self._release(holder)

    def _beat(self, sock: zmq.Socket[Any]) -> None:
        frame = encode(HeadBeat(timestamp=time.time()))
        for holder in self.holders().values():
            _send(sock, holder.identity, frame)


def _send(sock: zmq.Socket[Any], identity: bytes, payload: bytes) -> None:
    """Send without blocking; a gone or congested peer loses the message (logged)."""
    try:
        sock.send_multipart([identity, payload], flags=zmq.NOBLOCK)
    except zmq.ZMQError as e:
        logger.debug("could not send to engine %s: %s", identity.hex(), e)

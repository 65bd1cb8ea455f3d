"""`EngineClient`: one API server's links to its engine cores (docs/design/0003-scale-out.md).

    async with start_head(settings, stats_sink) as client:  # kubellm.server.head: single shape
        async for out in client.generate(request_id, prompt_token_ids, sampling, time.time()):
            ...

The client binds a ROUTER (input) and a PULL (output) at its `ClientAddress`; engines dial in
after the coordinator welcomed them. Each engine that sends `EngineReady` with the head's
`EngineCompat` gets a *slot* for its rank; a mismatching one is sent `EngineEvicted`. Requests
go to the least loaded ready slot (`kubellm.server.balancer`).

A slot dies (design note 0002, per slot) when its engine says `EngineDead`, its heartbeats stop,
it makes no progress while it has work, its connection to this ROUTER closes, its process
exits (engines this process spawned: `local`), or a new incarnation of its rank becomes ready.
Death fails only that slot's requests and utility calls with `EngineDeadError`; anything the
dead incarnation sends afterwards is answered with `EngineEvicted`, so it exits. The death of a
local engine is fatal (`errored`): the launcher's watchdog then ends the process.

Draining: an engine told to stop gracefully (a headless engine pod removed on scale-down) says
`EngineDraining`; its slot stays alive for its requests in flight but takes no new ones and no
longer counts as ready, and the client answers `DrainingAck` (after every request it sent the
engine, links being FIFO). Its `EngineDead(clean=True)` normally finds nothing left to fail.

Connection loss: libzmq builds without the draft API have no ROUTER_NOTIFY, so a socket monitor
reports that *some* peer disconnected, and the client then probes each ready slot with an empty
`AbortRequests` (a no-op for the engine): with ROUTER_MANDATORY a send to a peer whose
connection is gone fails at once with EHOSTUNREACH.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from kubellm.engine.transport import (
    INPUT_HWM,
    OUTPUT_HWM,
    compat_mismatches,
    curve_allowed_clients,
    curve_server,
    parse_engine_identity,
    set_socket_options,
)
from kubellm.protocol.codec import BadFrame, encode, engine_to_client_decoder
from kubellm.protocol.messages import (
    AbortRequests,
    AddRequest,
    ClientAddress,
    DrainingAck,
    EngineCompat,
    EngineDead,
    EngineDraining,
    EngineEvicted,
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
from kubellm.server.balancer import Balancer
from kubellm.server.engine_slots import (
    EngineView,
    LocalEngineSet,
    Memory,
    Request,
    Slot,
    identity_of,
)
from kubellm.server.errors import (
    EngineDeadError,
    EngineGenerateError,
    EngineStartupError,
    EngineUnavailableError,
)
from kubellm.server.stats import RequestStats, StatsSink

logger = logging.getLogger(__name__)

UtilityArg = str | int | float | bool | None
UtilityValue = str | int | float | bool | list[str] | dict[str, float] | None

_MONITOR_INTERVAL_S = 0.1
_LOOP_STALL_S = 1.0
"""A monitor tick later than this means the event loop itself was blocked: heartbeats may be
queued unread, so the heartbeat check waits one more tick."""
_PROBE_WINDOW_S = 1.0
"""After a disconnect event, probe the ready slots' connections for this long."""
_LOCAL_EXIT_GRACE_S = 0.5
"""A local engine whose connection closed is declared dead this long later, unless its
process exit (the more telling reason) is seen first."""
_STARTUP_REASON_WAIT_S = 0.5
"""How long to wait for the EngineDead of a local engine that exited during start-up."""


class EngineClient:
    """One API server's slots, balancing and failure handling. `start()` binds the links and
    returns at once; `wait_for_engines` waits for ranks to become ready."""

    def __init__(
        self,
        settings: ServeSettings,
        stats: StatsSink,
        *,
        address: ClientAddress,
        compat: EngineCompat,
        client_index: int = 0,
        local: LocalEngineSet | None = None,
        goodbye_reason: Callable[[int], str | None] | None = None,
    ):
        """`goodbye_reason(rank)`: why an engine that never became ready said it stopped (the
        coordinator hears that; this client does not)."""
        self.settings = settings
        self._goodbye_reason = goodbye_reason
        self._frontend = settings.frontend
        self._sink = stats
        self._address = address
        self._compat = compat
        self._client_index = client_index
        self._local = local
        self._local_ranks = frozenset(local.ranks) if local is not None else frozenset()
        self._balancer = Balancer(client_index, settings.parallel.data_parallel_size)
        self._ctx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.ROUTER)
        self._output = self._ctx.socket(zmq.PULL)
        self._monitor: zmq.asyncio.Socket | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._decoder = engine_to_client_decoder()
        self._slots: dict[int, Slot] = {}
        """rank → its latest incarnation's slot (ready or dead)."""
        self._evicted = Memory()
        """Identities this client no longer accepts, with the reason."""
        self._early_dead = Memory()
        """EngineDead reasons of identities that never became ready here."""
        self._warned = Memory()
        """Identities whose eviction was logged (once each)."""
        self._exits_seen: set[int] = set()
        self._first_facts: EngineFacts | None = None
        self._requests: dict[str, Request] = {}
        self._calls: dict[int, tuple[Slot, asyncio.Future[UtilityValue]]] = {}
        self._call_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._dead_error: EngineDeadError | None = None
        self._probe_until = 0.0
        self._started = False
        self._stopping = False
        self._closed = False

    async def __aenter__(self) -> EngineClient:
        try:
            await self.start()
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
        """The facts of the lowest-ranked ready engine, else of the first that was ready.
        Raises EngineUnavailableError before any engine was ready."""
        ready = self._ready_slots()
        if ready:
            return ready[0].facts
        if self._first_facts is None:
            raise EngineUnavailableError("no engine has been ready yet")
        return self._first_facts

    @property
    def num_ready(self) -> int:
        return len(self._ready_slots())

    @property
    def ready(self) -> bool:
        """Whether this API server can take requests: enough engines are ready."""
        if self.errored or self._closed:
            return False
        return self.num_ready >= self.settings.parallel.required_engines

    def engines(self) -> list[EngineView]:
        """Every rank seen so far (its latest incarnation), by rank."""
        return [self._slots[rank].view() for rank in sorted(self._slots)]

    @property
    def errored(self) -> bool:
        """A local engine died: fatal for this process."""
        return self._dead_error is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead_error

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def in_flight_request_ids(self) -> list[str]:
        """Ids of the requests whose streams are open (for draining at shutdown)."""
        return list(self._requests)

    async def check_health(self) -> None:
        """Raises EngineDeadError when a local engine died (a fresh one each call, so that
        repeated health checks do not grow one exception's traceback)."""
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error))

    def _ready_slots(self) -> list[Slot]:
        """Alive slots that take new requests (not draining), by rank."""
        return [slot for slot in self._live_slots() if not slot.draining]

    def _live_slots(self) -> list[Slot]:
        """Alive slots, draining ones included (their requests are still watched), by rank."""
        return [self._slots[r] for r in sorted(self._slots) if self._slots[r].alive]

    # -- start-up -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the engine links and start the background tasks; does not wait for engines."""
        if self._started:
            raise RuntimeError("the engine client was already started")
        self._started = True
        curve_dir = self.settings.parallel.zmq_curve_dir
        if curve_dir:
            allowed = curve_allowed_clients(curve_dir)
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(allowed))
            for sock in (self._input, self._output):
                curve_server(sock, curve_dir)
        self._input.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.IPV6, 1)  # dual stack: binds IPv6 addresses too
        set_socket_options(self._input, receives=True, hwm=INPUT_HWM, linger_ms=0)
        set_socket_options(self._output, receives=True, hwm=OUTPUT_HWM, linger_ms=0)
        self._monitor = monitor = self._input.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        for sock, address in (
            (self._input, self._address.input),
            (self._output, self._address.output),
        ):
            try:
                sock.bind(address)
            except zmq.ZMQError as e:
                raise EngineStartupError(f"cannot bind the engine link {address}: {e}") from None
        loops = {
            "input": self._input_loop(),
            "output": self._output_loop(),
            "disconnects": self._disconnect_loop(monitor),
            "monitor": self._monitor_loop(),
        }
        self._tasks = [
            asyncio.create_task(self._guarded(loop, name), name=f"engine-{name}")
            for name, loop in loops.items()
        ]
        logger.info(
            "API server %d: engine links at %s (requests) and %s (outputs)%s",
            self._client_index,
            self._address.input,
            self._address.output,
            ", CURVE" if curve_dir else "",
        )

    async def wait_for_engines(self, ranks: Collection[int], timeout: float) -> None:
        """Wait until each of `ranks` is ready. Raises EngineStartupError when a local engine
        exits first (with the reason it reported, if any) or on timeout."""
        wanted = sorted(set(ranks))
        started = time.monotonic()
        while True:
            missing = [r for r in wanted if r not in self._slots or not self._slots[r].alive]
            if not missing:
                break
            await self._raise_if_exited(missing)
            if self._closed:
                raise EngineStartupError("the engine client was shut down during start-up")
            if self._dead_error is not None:
                raise EngineStartupError(f"{self._dead_error} during start-up")
            if time.monotonic() - started >= timeout:
                raise EngineStartupError(f"{_ranks(missing)} not ready within {timeout:g} s")
            await asyncio.sleep(0.05)
        if wanted:
            logger.info("%s ready after %.1f s", _ranks(wanted), time.monotonic() - started)

    async def _raise_if_exited(self, ranks: Sequence[int]) -> None:
        if self._local is None:
            return
        self._check_local_exits()
        exited = self._local.exited()
        for rank in ranks:
            if rank not in exited:
                continue
            deadline = time.monotonic() + _STARTUP_REASON_WAIT_S
            while (reason := self._early_dead_reason(rank)) is None:
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.02)
            detail = f": {reason}" if reason else " (see the engine log above)"
            raise EngineStartupError(
                f"engine {rank} exited with code {exited[rank]} during start-up{detail}"
            )

    def _early_dead_reason(self, rank: int) -> str | None:
        for identity, reason in reversed(self._early_dead.items()):
            parsed = parse_engine_identity(identity)
            if parsed is not None and parsed[0] == rank:
                return reason
        return self._goodbye_reason(rank) if self._goodbye_reason is not None else None

    def _decode(self, frame: bytes) -> EngineToClient | None:
        try:
            return self._decoder.decode(frame)
        except BadFrame as e:
            logger.warning("dropped a bad frame from an engine: %s", e)
            return None

    # -- background tasks ---------------------------------------------------------------------

    async def _input_loop(self) -> None:
        """Handshakes (`EngineReady`) on the ROUTER."""
        while True:
            frames = await self._input.recv_multipart()
            if len(frames) != 2:
                logger.warning("dropped a %d-part message on the engine input link", len(frames))
                continue
            identity, payload = frames
            msg = self._decode(payload)
            try:
                if isinstance(msg, EngineReady):
                    await self._on_ready(identity, msg.facts)
                elif identity in self._evicted:
                    await self._evict(identity, self._evicted[identity])
                elif msg is not None:
                    logger.warning("ignored a %s on the engine input link", type(msg).__name__)
            except zmq.ZMQError as e:
                logger.warning("could not answer engine %r: %s", identity, e)

    async def _guarded(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background loop; its failure leaves this client unable to work: fatal."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("the engine %s task failed", name)
            self._set_fatal(f"the engine {name} task failed: {e}")

    async def _output_loop(self) -> None:
        """Outputs, heartbeats, utility results and goodbyes on the PULL."""
        while True:
            msg = self._decode(await self._output.recv())
            if msg is not None:
                await self._dispatch(msg)

    async def _disconnect_loop(self, monitor: zmq.asyncio.Socket) -> None:
        """Disconnect events of the ROUTER start a round of connection probes."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._probe_until = time.monotonic() + _PROBE_WINDOW_S

    async def _monitor_loop(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL_S)
            now = time.monotonic()
            stalled, last_tick = now - last_tick > _LOOP_STALL_S, now
            self._check_local_exits()
            for slot in self._live_slots():
                self._check_slot(slot, now, stalled)
            if now < self._probe_until:
                await self._probe_connections(now)

    def _check_local_exits(self) -> None:
        if self._local is None:
            return
        for rank, code in self._local.exited().items():
            if rank in self._exits_seen:
                continue
            self._exits_seen.add(rank)
            reason = f"the engine process exited with code {code}"
            slot = self._slots.get(rank)
            if slot is not None and slot.alive:
                self._declare_dead(slot, reason)
            else:
                self._set_fatal(f"engine {rank}: {reason}")

    def _check_slot(self, slot: Slot, now: float, stalled: bool) -> None:
        limit = self._frontend.engine_heartbeat_timeout_s
        if not stalled and now - slot.last_heartbeat > limit:
            self._declare_dead(slot, f"no heartbeat for {limit:g} s")
        elif slot.disconnected_at is not None and now - slot.disconnected_at > _LOCAL_EXIT_GRACE_S:
            self._declare_dead(slot, "its connection to this API server closed")

    async def _probe_connections(self, now: float) -> None:
        """Find live slots whose connection is gone (see the module docstring)."""
        for slot in self._live_slots():
            if slot.disconnected_at is not None:
                continue
            try:
                await self._input.send_multipart(
                    [slot.identity, encode(AbortRequests(request_ids=()))], flags=zmq.NOBLOCK
                )
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    self._connection_lost(slot, now)

    def _connection_lost(self, slot: Slot, now: float) -> None:
        if slot.local:  # give its process exit a moment to be seen: it says more
            slot.disconnected_at = slot.disconnected_at or now
        else:
            self._declare_dead(slot, "its connection to this API server closed")

    # -- engine messages ----------------------------------------------------------------------

    async def _on_ready(self, identity: bytes, facts: EngineFacts) -> None:
        rank, incarnation = facts.engine_index, facts.incarnation
        if identity in self._evicted:
            await self._evict(identity, self._evicted[identity])
            return
        reason = self._refusal(identity, facts)
        if reason is not None:
            logger.error(
                "refusing engine %d (incarnation %016x on %s, pid %d): %s",
                rank,
                incarnation,
                facts.host,
                facts.pid,
                reason,
            )
            self._evicted.remember(identity, reason)
            self._warned.remember(identity, reason)
            await self._evict(identity, reason)
            return
        if identity in self._early_dead:
            return  # it said goodbye before its handshake was read
        old = self._slots.get(rank)
        if old is not None and old.identity == identity:
            return  # a repeated handshake
        if old is not None:
            self._declare_dead(old, f"replaced by its new incarnation {incarnation:016x}")
        self._slots[rank] = Slot(
            facts=facts,
            identity=identity,
            local=rank in self._local_ranks,
            last_heartbeat=time.monotonic(),
        )
        if self._first_facts is None:
            self._first_facts = facts
        logger.info(
            "engine %d ready: incarnation %016x on %s (pid %d), model %s, max_model_len %d; "
            "%d of %d engine(s) ready",
            rank,
            incarnation,
            facts.host,
            facts.pid,
            facts.model,
            facts.max_model_len,
            self.num_ready,
            self.settings.parallel.data_parallel_size,
        )

    def _refusal(self, identity: bytes, facts: EngineFacts) -> str | None:
        """Why this API server does not accept an engine; None when it does."""
        size = self.settings.parallel.data_parallel_size
        if parse_engine_identity(identity) != (facts.engine_index, facts.incarnation):
            return f"its routing id {identity.hex()} does not match its facts"
        if not 0 <= facts.engine_index < size:
            return f"rank {facts.engine_index} is outside 0..{size - 1}"
        mismatches = compat_mismatches(self._compat, facts.compat)
        if mismatches:
            return "incompatible with this API server: " + "; ".join(mismatches)
        return None

    async def _dispatch(self, msg: EngineToClient) -> None:
        if isinstance(msg, UtilityResult):
            self._on_utility_result(msg)
            return
        if isinstance(msg, EngineReady):
            logger.warning("ignored an EngineReady on the engine output link")
            return
        identity = identity_of(msg.engine_index, msg.incarnation)
        slot = self._slots.get(msg.engine_index)
        if slot is None or slot.identity != identity or not slot.alive:
            await self._from_unknown(identity, msg)
        elif isinstance(msg, EngineOutputs):
            for out in msg.outputs:
                request = self._requests.get(out.request_id)
                if request is not None and request.slot is slot:
                    request.queue.put_nowait(out)
            if msg.stats is not None:
                self._record_engine_stats(slot, msg.stats)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(slot, msg)
        elif isinstance(msg, EngineDraining):
            await self._on_draining(slot, msg)
        else:
            what = "it stopped" if msg.clean else "it reported a fatal error"
            self._declare_dead(slot, f"{what}: {msg.reason}")

    async def _on_draining(self, slot: Slot, msg: EngineDraining) -> None:
        """No new requests for the slot; its own go on. Acknowledged after every request this
        client sent it (the link is FIFO), so the engine knows when none can still arrive."""
        if slot.draining:
            return
        slot.draining_deadline_s = msg.deadline_s
        logger.info(
            "engine %d draining (deadline %g s): %d request(s) of this API server in flight; "
            "%d of %d engine(s) ready",
            slot.rank,
            msg.deadline_s,
            len(slot.requests),
            self.num_ready,
            self._size,
        )
        with contextlib.suppress(EngineDeadError):  # gone already: its requests fail with it
            await self._send(slot, DrainingAck(client_index=self._client_index))

    async def _from_unknown(
        self,
        identity: bytes | None,
        msg: EngineOutputs | Heartbeat | EngineDraining | EngineDead,
    ) -> None:
        """A message from an incarnation without a ready slot: a dead one is evicted; an
        EngineDead before the handshake is kept for start-up errors; the rest is dropped."""
        if identity is None:
            logger.warning("dropped a %s with a bad engine id", type(msg).__name__)
        elif isinstance(msg, EngineDead):
            if identity not in self._evicted:
                self._early_dead.remember(identity, msg.reason)
        elif identity in self._evicted:
            await self._evict(identity, self._evicted[identity])

    def _on_heartbeat(self, slot: Slot, beat: Heartbeat) -> None:
        slot.last_heartbeat = time.monotonic()
        self._record_engine_stats(slot, beat.stats)
        limit = self._frontend.engine_progress_timeout_s
        if beat.seconds_since_progress > limit:
            self._declare_dead(
                slot,
                f"no progress for {beat.seconds_since_progress:.1f} s while it had work "
                f"(limit {limit:g} s)",
            )

    def _on_utility_result(self, msg: UtilityResult) -> None:
        entry = self._calls.get(msg.call_id)
        if entry is None or entry[1].done():
            return
        future = entry[1]
        if msg.error is not None:
            future.set_exception(EngineGenerateError(f"engine utility failed: {msg.error}"))
        else:
            future.set_result(msg.result)

    async def _evict(self, identity: bytes, reason: str) -> None:
        """Tell an engine this API server no longer accepts it (it then exits)."""
        if identity not in self._warned:
            self._warned.remember(identity, reason)
            parsed = parse_engine_identity(identity) or (-1, 0)
            logger.warning("evicting engine %d (incarnation %016x): %s", *parsed, reason)
        with contextlib.suppress(zmq.ZMQError):  # gone already, or not reading: it dies anyway
            await self._input.send_multipart(
                [identity, encode(EngineEvicted(reason=reason))], flags=zmq.NOBLOCK
            )

    def _record_engine_stats(self, slot: Slot, stats: SchedulerStats) -> None:
        slot.stats = stats
        slot.sent_since_stats = 0
        try:
            self._sink.record_engine_stats(slot.rank, stats)
        except Exception:
            logger.exception("stats sink failed on engine stats")

    # -- death --------------------------------------------------------------------------------

    def _declare_dead(self, slot: Slot, reason: str) -> None:
        """Fail the slot's requests and calls; fatal when its engine is local."""
        if not slot.alive or self._closed:
            return
        slot.dead_reason = reason
        self._evicted.remember(slot.identity, reason)
        expected = self._stopping or (slot.draining and not slot.requests and not slot.calls)
        logger.log(
            logging.INFO if expected else logging.ERROR,
            "engine %d (incarnation %016x on %s, pid %d) is dead: %s; failing %d request(s)",
            slot.rank,
            slot.facts.incarnation,
            slot.facts.host,
            slot.facts.pid,
            reason,
            len(slot.requests),
        )
        error = EngineDeadError(f"engine {slot.rank} died: {reason}")
        for request_id in slot.requests:
            self._requests[request_id].queue.put_nowait(error)
        for call_id in slot.calls:
            future = self._calls[call_id][1]
            if not future.done():
                future.set_exception(EngineDeadError(str(error)))
        if slot.local:
            self._set_fatal(f"engine {slot.rank}: {reason}")
        else:
            level = logging.INFO if expected else logging.WARNING
            logger.log(level, "%d of %d engine(s) ready", self.num_ready, self._size)

    def _set_fatal(self, reason: str) -> None:
        if self._dead_error is not None or self._closed or self._stopping:
            return
        logger.error("a local engine core died: %s", reason)
        self._dead_error = EngineDeadError(f"engine core died: {reason}")

    @property
    def _size(self) -> int:
        return self.settings.parallel.data_parallel_size

    # -- requests -----------------------------------------------------------------------------

    def _ensure_usable(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine client is shut down")
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error))

    def _unavailable(self) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"no engine is ready to take this request (of {self._size} expected); try again later"
        )

    async def _send(
        self, slot: Slot, msg: AddRequest | AbortRequests | UtilityRequest | DrainingAck
    ) -> None:
        """Send to a slot's engine; EngineDeadError when its connection is gone (the slot is
        then dead, or for a local engine about to be)."""
        try:
            await self._input.send_multipart([slot.identity, encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._connection_lost(slot, time.monotonic())
            raise EngineDeadError(
                f"engine {slot.rank} died: its connection to this API server closed"
            ) from e

    async def _submit(
        self, request: AddRequest, queue: asyncio.Queue[RequestOutput | EngineDeadError]
    ) -> Slot:
        """Send a request to the least loaded ready slot, registered there. A slot whose
        connection turns out gone is skipped (the request never reached it)."""
        request_id = request.request_id
        while True:
            usable = (s for s in self._ready_slots() if s.disconnected_at is None)
            rank = self._balancer.pick(s.load() for s in usable)
            if rank is None:
                raise self._unavailable()
            slot = self._slots[rank]
            self._requests[request_id] = Request(slot, queue)
            slot.requests.add(request_id)
            slot.sent_since_stats += 1
            try:
                await self._send(slot, request)
                return slot
            except EngineDeadError:
                self._forget(request_id)
                self._ensure_usable()
            except BaseException:
                self._forget(request_id)
                self._abort_in_background(request_id, slot)  # it may have gone out
                raise

    def _forget(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            request.slot.requests.discard(request_id)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        arrival_time: float,
        stats: RequestStats | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (deltas) until one carries a finish_reason.

        Raises EngineUnavailableError (no engine ready; nothing was sent), EngineDeadError
        (its engine died) or EngineGenerateError (this request failed). Closing or cancelling
        the consumer aborts the request in the engine.
        """
        self._ensure_usable()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        request = AddRequest(
            request_id=request_id,
            prompt_token_ids=tuple(prompt_token_ids),
            sampling=sampling,
            arrival_time=arrival_time,
            client_index=self._client_index,
        )
        queue: asyncio.Queue[RequestOutput | EngineDeadError] = asyncio.Queue()
        slot = await self._submit(request, queue)
        rs = stats if stats is not None else RequestStats(arrival_time=arrival_time)
        rs.num_prompt_tokens = len(prompt_token_ids)
        rs.max_tokens_param = sampling.max_tokens
        rs.engine_index = slot.rank
        finished = False
        try:
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
                self._abort_in_background(request_id, slot)
            raise
        finally:
            self._forget(request_id)
            rs.finish_time = time.time()
            self._record_request(rs)

    def _abort_in_background(self, request_id: str, slot: Slot) -> None:
        if not slot.alive or self._closed:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._abort_on(slot, [request_id]))
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
        """Stop these requests in their engines; their streams end with finish_reason "abort".
        Ids that are not in flight are ignored."""
        if self._closed:
            return
        by_slot: dict[int, tuple[Slot, list[str]]] = {}
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None and request.slot.alive:
                by_slot.setdefault(id(request.slot), (request.slot, []))[1].append(request_id)
        for slot, ids in by_slot.values():
            await self._abort_on(slot, ids)

    async def _abort_on(self, slot: Slot, request_ids: list[str]) -> None:
        if not slot.alive or self._closed:
            return
        with contextlib.suppress(EngineDeadError):  # its requests fail with it
            await self._send(slot, AbortRequests(request_ids=tuple(request_ids)))

    async def call_utility(
        self,
        method: str,
        *args: UtilityArg,
        timeout: float = 30.0,
        engine_index: int | None = None,
    ) -> UtilityValue:
        """Call an engine utility ("ping", "get_supported_tasks", "get_stats", ...) on engine
        `engine_index`, or on a ready engine when None."""
        self._ensure_usable()
        slot = self._utility_slot(engine_index)
        call_id = next(self._call_ids)
        future: asyncio.Future[UtilityValue] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (slot, future)
        slot.calls.add(call_id)
        request = UtilityRequest(
            call_id=call_id, method=method, args=tuple(args), client_index=self._client_index
        )
        try:
            await self._send(slot, request)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"engine {slot.rank} utility {method!r} got no answer within {timeout:g} s"
            ) from None
        finally:
            self._calls.pop(call_id, None)
            slot.calls.discard(call_id)

    def _utility_slot(self, engine_index: int | None) -> Slot:
        if engine_index is None:
            ready = self._ready_slots()
            if not ready:
                raise self._unavailable()
            return ready[0]
        slot = self._slots.get(engine_index)
        if slot is None:
            raise EngineUnavailableError(f"engine {engine_index} is not ready")
        if not slot.alive:
            raise EngineDeadError(f"engine {engine_index} died: {slot.dead_reason}")
        return slot

    # -- shutdown -----------------------------------------------------------------------------

    def expect_engine_exits(self) -> None:
        """The local engines are being stopped: their deaths are no longer fatal (their
        requests still fail)."""
        self._stopping = True

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Fail pending requests and calls, stop the tasks and close the links. Idempotent.
        Does not stop local engines: whoever spawned them does."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
        error = EngineDeadError("the engine client is shut down")
        for request in self._requests.values():
            request.queue.put_nowait(error)
        for _, future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(str(error)))
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._input.disable_monitor()
            self._monitor.close(linger=0)
        self._input.close(linger=0)
        self._output.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


def _ranks(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"engine {ranks[0]} was"
    return f"engines {', '.join(map(str, ranks))} were"


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

"""The per-engine bookkeeping of an API server's `EngineClient`: slots, views, requests."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kubellm.engine.transport import engine_identity
from kubellm.protocol.messages import EngineFacts, RequestOutput, SchedulerStats
from kubellm.server.balancer import EngineLoad
from kubellm.server.errors import EngineDeadError

REMEMBERED = 1024
"""Most dead identities remembered (to answer them with EngineEvicted)."""


class LocalEngineSet(Protocol):
    """What the client needs of `kubellm.server.local_engines.LocalEngines`."""

    @property
    def ranks(self) -> tuple[int, ...]: ...

    def exited(self) -> dict[int, int]:
        """rank → return code of the engines that have exited."""
        ...


@dataclass(frozen=True)
class EngineView:
    """One engine as this API server sees it (for /ready, /metrics and logs)."""

    rank: int
    incarnation: int
    host: str
    pid: int
    state: Literal["ready", "draining", "dead"]
    in_flight: int
    """This API server's requests on it."""
    stats: SchedulerStats
    """Its last report."""
    dead_reason: str | None


@dataclass(eq=False)
class Slot:
    """One ready (or, once declared dead, dead) incarnation of a rank."""

    facts: EngineFacts
    identity: bytes
    local: bool
    last_heartbeat: float
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    sent_since_stats: int = 0
    requests: set[str] = field(default_factory=set)
    calls: set[int] = field(default_factory=set)
    dead_reason: str | None = None
    disconnected_at: float | None = None
    draining_deadline_s: float | None = None
    """Set when the engine said `EngineDraining`: it takes no new request, finishes its own."""

    @property
    def rank(self) -> int:
        return self.facts.engine_index

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    @property
    def draining(self) -> bool:
        return self.draining_deadline_s is not None

    @property
    def ready(self) -> bool:
        """Alive and taking new requests."""
        return self.alive and not self.draining

    def load(self) -> EngineLoad:
        return EngineLoad(
            rank=self.rank,
            waiting=self.stats.num_waiting,
            running=self.stats.num_running,
            sent_since_stats=self.sent_since_stats,
            kv_cache_usage=self.stats.kv_cache_usage,
            draining=self.draining,
        )

    def view(self) -> EngineView:
        return EngineView(
            rank=self.rank,
            incarnation=self.facts.incarnation,
            host=self.facts.host,
            pid=self.facts.pid,
            state="dead" if not self.alive else "draining" if self.draining else "ready",
            in_flight=len(self.requests),
            stats=self.stats,
            dead_reason=self.dead_reason,
        )


@dataclass(eq=False)
class Request:
    slot: Slot
    queue: asyncio.Queue[RequestOutput | EngineDeadError]


def identity_of(rank: int, incarnation: int) -> bytes | None:
    try:
        return engine_identity(rank, incarnation)
    except OverflowError:
        return None


class Memory(OrderedDict[bytes, str]):
    """identity → reason, forgetting the oldest beyond `REMEMBERED` entries."""

    def remember(self, identity: bytes, reason: str) -> None:
        self[identity] = reason
        while len(self) > REMEMBERED:
            self.popitem(last=False)

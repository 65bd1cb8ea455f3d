"""Which engine gets the next request (docs/design/0003-scale-out.md, "What each API server
does with several engines").

Pure: the engine client describes each ready engine's load as an `EngineLoad`, and
`Balancer.pick` returns the rank to send to. The score is `4 * waiting + running + sent since
the engine's last stats report`, so an engine that is already queueing is avoided more than one
that is merely busy, and requests sent between two reports are counted at once. Ties go to the
lower KV cache usage, then round the ranks in rotation, starting at the API server's own index
so that N API servers do not all pick engine 0. A draining engine (it said `EngineDraining`) is
never picked: it finishes what it has and then stops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

WAITING_WEIGHT = 4
"""How much more a waiting request counts than a running one."""


@dataclass(frozen=True)
class EngineLoad:
    """What the balancer knows about one ready engine."""

    rank: int
    waiting: int = 0
    """Requests queued in the engine (its last report)."""
    running: int = 0
    """Requests running in the engine (its last report)."""
    sent_since_stats: int = 0
    """Requests this API server sent it since that report."""
    kv_cache_usage: float = 0.0
    """Fraction of its KV blocks in use (its last report)."""
    draining: bool = False
    """It is stopping gracefully: it takes no new request."""

    @property
    def score(self) -> int:
        return WAITING_WEIGHT * self.waiting + self.running + self.sent_since_stats


class Balancer:
    """Picks the least loaded engine; equally loaded ones take turns."""

    def __init__(self, client_index: int = 0, size: int = 1):
        if client_index < 0 or size < 1:
            raise ValueError(f"bad balancer arguments: client_index {client_index}, size {size}")
        self._size = size
        self._cursor = client_index % size
        """The rank that goes first among equally loaded engines."""

    def pick(self, loads: Iterable[EngineLoad]) -> int | None:
        """The rank to send the next request to; None when no engine in `loads` can take it."""
        candidates = [load for load in loads if not load.draining]
        if not candidates:
            return None
        modulus = max(self._size, *(c.rank + 1 for c in candidates))
        cursor = self._cursor % modulus
        best = min(
            candidates,
            key=lambda c: (c.score, c.kv_cache_usage, (c.rank - cursor) % modulus),
        )
        self._cursor = (best.rank + 1) % modulus
        return best.rank

"""The seam between the request path and metrics: the engine client reports, metrics record.

`kubellm.server.metrics.PrometheusMetrics` implements `StatsSink` with vLLM's metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kubellm.protocol.messages import FinishReason, SchedulerStats


@dataclass
class RequestStats:
    """Filled in by the engine client for each engine request, reported when it ends."""

    arrival_time: float
    """time.time() when the API server received the request."""
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    max_tokens_param: int | None = None
    n_param: int = 1
    engine_index: int = 0
    """The engine (data-parallel rank) that served it."""


class StatsSink(Protocol):
    def record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None: ...

    def record_request(self, stats: RequestStats) -> None: ...


class NullStatsSink:
    def record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None:
        pass

    def record_request(self, stats: RequestStats) -> None:
        pass

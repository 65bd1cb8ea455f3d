"""Prometheus metrics with vLLM's names, on the server's own registry.

`PrometheusMetrics` implements `kubellm.server.stats.StatsSink`: the engine client reports
scheduler stats and finished requests, this records them. `HttpMetricsMiddleware` counts HTTP
requests by route template (never by raw path, which would let clients create series).

Several API servers on one host (the multi shape, docs/design/0003-scale-out.md) share one
view through prometheus_client's multiprocess mode, as vLLM does: the supervisor gives its
children a private directory in PROMETHEUS_MULTIPROC_DIR (read when prometheus_client is
imported, so it must be in the environment from the start), each child records into its own
mmap files there, and every child's /metrics merges all the files, whichever child a scrape
reaches:

* counters and histograms (requests, tokens, latencies, HTTP) are summed over the processes,
  dead ones included, so they never go backwards;
* the engine gauges (running, waiting, KV usage) use the "livemostrecent" mode: every API
  server hears every engine's heartbeats and sets the same values, so the newest write wins
  instead of a sum; "live" lets the supervisor drop a dead child's gauges
  (`mark_process_dead`);
* the engines' cumulative counters (preemptions, prefix cache queries and hits) are also heard
  by every API server, so only one of them (`engine_totals=True`, API server 0) counts them;
  the others create the series at 0, which adds nothing to the sum.

Without the variable (the single shape) each process renders its own registry, as before.
A single-shape server started with the variable set uses that directory the same way (as
vLLM does); whoever sets it must empty it between runs.
"""

from __future__ import annotations

import logging
import os
import time
import typing

from fastapi import APIRouter, Request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubellm.protocol.messages import FinishReason, SchedulerStats
from kubellm.server.stats import RequestStats

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's variable: the directory of its multiprocess mode's files."""
ENGINE_GAUGE_MODE: typing.Literal["livemostrecent"] = "livemostrecent"
"""How the engine gauges merge over API server processes: the newest value, not a sum."""

_LABELS = ("model_name", "engine")
FINISH_REASONS: tuple[FinishReason, ...] = typing.get_args(FinishReason)

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
DEFAULT_MAX_TOKENS_BUCKET = 1_000_000
"""Upper end of the token-count buckets when the max model length is not known yet."""


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's `build_1_2_5_buckets`)."""
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode when this process records in it;
    None for a per-process registry. ValueError when the variable names no directory."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}={path}: no such directory")
    if not getattr(values.ValueClass, "_multiprocess", False):
        logger.warning(
            "%s is set but prometheus_client was imported before it was; "
            "/metrics shows this process only",
            MULTIPROC_ENV,
        )
        return None
    return path


def mark_process_dead(path: str, pid: int) -> None:
    """Drop a dead process's engine gauges from the multiprocess directory `path` (its
    counters and histograms stay in the sums)."""
    multiprocess.mark_process_dead(pid, path)


class PrometheusMetrics:
    """vLLM-named engine and request metrics (labels model_name, engine="<rank>").

    `engine_totals`: whether this process counts the engines' cumulative counters; False in all
    but one API server of the multi shape (see the module docstring)."""

    def __init__(
        self, model_name: str, *, max_model_len: int | None = None, engine_totals: bool = True
    ) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is not None:
            logger.info("metrics: multiprocess mode in %s", self.multiprocess_dir)
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.engine_totals = engine_totals
        self._last: dict[int, SchedulerStats] = {}
        self._touched: set[tuple[str, str]] = set()
        self._make_engine_metrics()
        self._make_request_metrics(max_model_len or DEFAULT_MAX_TOKENS_BUCKET)
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status.",
            ("method", "handler", "status"),
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by method and route template.",
            ("method", "handler"),
            registry=self.registry,
        )

    def _make_engine_metrics(self) -> None:
        r = self.registry
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests in the engine's running batch.",
            _LABELS,
            registry=r,
            multiprocess_mode=ENGINE_GAUGE_MODE,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            _LABELS,
            registry=r,
            multiprocess_mode=ENGINE_GAUGE_MODE,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0..1).",
            _LABELS,
            registry=r,
            multiprocess_mode=ENGINE_GAUGE_MODE,
        )
        self.preemptions = Counter(
            "vllm:num_preemptions", "Cumulative preemptions.", _LABELS, registry=r
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            _LABELS,
            registry=r,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            _LABELS,
            registry=r,
        )

    def _make_request_metrics(self, max_len: int) -> None:
        r = self.registry
        tokens = buckets_1_2_5(max_len)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", _LABELS, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens produced.", _LABELS, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            (*_LABELS, "finished_reason"),
            registry=r,
        )

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS
        )
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.req_gen = hist(
            "vllm:request_generation_tokens", "Generated tokens per request.", tokens
        )
        self.req_max_tokens = hist(
            "vllm:request_params_max_tokens", "The max_tokens request parameter.", tokens
        )
        self.req_n = hist("vllm:request_params_n", "The n request parameter.", N_BUCKETS)

    def set_model_name(self, name: str) -> None:
        """Relabel before serving (the name may only be known once the engine loaded the model);
        series recorded under the previous name are dropped (in multiprocess mode, where files
        cannot drop series, they stay)."""
        if name == self.model_name:
            return
        self.model_name = name
        if self.multiprocess_dir is None:
            for collector in (self.running, self.waiting, self.kv_usage, self.preemptions,
                              self.prefix_queries, self.prefix_hits):  # fmt: skip
                collector.clear()
        elif self._touched:
            logger.warning("metrics: series recorded before the rename to %s remain", name)
        self._touched.clear()

    def _touch(self, labels: tuple[str, str]) -> None:
        """Create the counters' series at 0 (as vLLM does), so dashboards and rate() see them
        before the first event."""
        if labels in self._touched:
            return
        self._touched.add(labels)
        for counter in (
            self.preemptions,
            self.prefix_queries,
            self.prefix_hits,
            self.prompt_tokens,
            self.generation_tokens,
        ):
            counter.labels(*labels)
        for reason in FINISH_REASONS:
            self.request_success.labels(*labels, reason)

    def record_engine_stats(self, engine_index: int, stats: SchedulerStats) -> None:
        labels = (self.model_name, str(engine_index))
        self._touch(labels)
        self.running.labels(*labels).set(stats.num_running)
        self.waiting.labels(*labels).set(stats.num_waiting)
        self.kv_usage.labels(*labels).set(stats.kv_cache_usage)
        if self.engine_totals:
            self._count_engine_totals(engine_index, labels, stats)

    def _count_engine_totals(
        self, engine_index: int, labels: tuple[str, str], stats: SchedulerStats
    ) -> None:
        """The engine reports running totals; the counters grow by the difference."""
        last = self._last.get(engine_index, SchedulerStats())
        for counter, new, old in (
            (self.preemptions, stats.num_preemptions, last.num_preemptions),
            (self.prefix_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
        ):
            delta = new - old if new >= old else new  # the engine restarted: counts from 0
            if delta > 0:
                counter.labels(*labels).inc(delta)
        self._last[engine_index] = stats

    def record_request(self, stats: RequestStats) -> None:
        labels = (self.model_name, str(stats.engine_index))
        self.prompt_tokens.labels(*labels).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(*labels).inc(stats.num_generation_tokens)
        if stats.finish_reason is not None:
            self.request_success.labels(*labels, stats.finish_reason).inc()
        if stats.first_token_time is not None:
            self.ttft.labels(*labels).observe(max(0.0, stats.first_token_time - stats.arrival_time))
        itl = self.itl.labels(*labels)
        for latency in stats.inter_token_latencies:
            itl.observe(latency)
        if stats.finish_time is not None:
            self.e2e.labels(*labels).observe(max(0.0, stats.finish_time - stats.arrival_time))
        self.req_prompt.labels(*labels).observe(stats.num_prompt_tokens)
        self.req_gen.labels(*labels).observe(stats.num_generation_tokens)
        if stats.max_tokens_param is not None:
            self.req_max_tokens.labels(*labels).observe(stats.max_tokens_param)
        self.req_n.labels(*labels).observe(stats.n_param)

    def record_http(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_duration.labels(method, handler).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text: this process's registry, or in multiprocess mode the merge of
        every process's files (the same whole-host view from each API server)."""
        if self.multiprocess_dir is None:
            return bytes(generate_latest(self.registry))
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return bytes(generate_latest(merged))


class HttpMetricsMiddleware:
    """Counts each HTTP request under its route template ("/v1/models/{model}"), or "none"
    when no route matched, with its status and duration."""

    def __init__(self, app: ASGIApp, *, metrics: PrometheusMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            handler = (
                route.path if isinstance(route, BaseRoute) and hasattr(route, "path") else "none"
            )
            self.metrics.record_http(
                scope.get("method", ""), handler, status, time.perf_counter() - start
            )


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    sink = getattr(request.app.state, "metrics", None)
    body = sink.render() if isinstance(sink, PrometheusMetrics) else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)

"""PrometheusMetrics: vLLM's names and labels, deltas of cumulative stats, HTTP metrics."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from kubellm.protocol.messages import SchedulerStats
from kubellm.server.metrics import (
    TTFT_BUCKETS,
    HttpMetricsMiddleware,
    PrometheusMetrics,
    buckets_1_2_5,
)
from kubellm.server.metrics import router as metrics_router
from kubellm.server.stats import RequestStats


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


LABELS = (("engine", "0"), ("model_name", "m"))


def labels(**extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"engine": "0", "model_name": "m", **extra}.items()))


def test_engine_gauges_and_counters_from_cumulative_stats() -> None:
    metrics = PrometheusMetrics("m")
    metrics.record_engine_stats(
        0,
        SchedulerStats(
            num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=1,
            prefix_cache_queries=100, prefix_cache_hits=40,
        ),
    )  # fmt: skip
    metrics.record_engine_stats(
        0,
        SchedulerStats(
            num_running=1, num_waiting=0, kv_cache_usage=0.5, num_preemptions=4,
            prefix_cache_queries=150, prefix_cache_hits=40,
        ),
    )  # fmt: skip
    got = samples(metrics)
    assert got[("vllm:num_requests_running", LABELS)] == 1
    assert got[("vllm:num_requests_waiting", LABELS)] == 0
    assert got[("vllm:kv_cache_usage_perc", LABELS)] == 0.5
    assert got[("vllm:num_preemptions_total", LABELS)] == 4
    assert got[("vllm:prefix_cache_queries_total", LABELS)] == 150
    assert got[("vllm:prefix_cache_hits_total", LABELS)] == 40


def test_counters_survive_an_engine_restart() -> None:
    metrics = PrometheusMetrics("m")
    metrics.record_engine_stats(0, SchedulerStats(prefix_cache_queries=100))
    metrics.record_engine_stats(0, SchedulerStats(prefix_cache_queries=30))  # restarted
    assert samples(metrics)[("vllm:prefix_cache_queries_total", LABELS)] == 130


def test_request_metrics() -> None:
    metrics = PrometheusMetrics("m", max_model_len=4096)
    metrics.record_request(
        RequestStats(
            arrival_time=100.0,
            num_prompt_tokens=7,
            num_generation_tokens=3,
            first_token_time=100.5,
            finish_time=102.0,
            finish_reason="length",
            inter_token_latencies=[0.2, 0.3],
            max_tokens_param=3,
            n_param=2,
        )
    )
    metrics.record_request(RequestStats(arrival_time=1.0, finish_reason="abort"))
    got = samples(metrics)
    assert got[("vllm:prompt_tokens_total", LABELS)] == 7
    assert got[("vllm:generation_tokens_total", LABELS)] == 3
    for reason in ("length", "abort"):
        assert got[("vllm:request_success_total", labels(finished_reason=reason))] == 1
    assert got[("vllm:time_to_first_token_seconds_sum", LABELS)] == 0.5
    assert got[("vllm:time_to_first_token_seconds_count", LABELS)] == 1
    assert got[("vllm:inter_token_latency_seconds_count", LABELS)] == 2
    assert got[("vllm:e2e_request_latency_seconds_sum", LABELS)] == 2.0
    assert got[("vllm:request_prompt_tokens_sum", LABELS)] == 7
    assert got[("vllm:request_generation_tokens_sum", LABELS)] == 3
    assert got[("vllm:request_params_max_tokens_count", LABELS)] == 1
    assert got[("vllm:request_params_n_sum", LABELS)] == 3
    assert ("vllm:request_prompt_tokens_bucket", labels(le="2000.0")) in got
    assert ("vllm:request_prompt_tokens_bucket", labels(le="5000.0")) not in got


def test_bucket_boundaries_follow_vllm() -> None:
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0


def test_each_instance_has_its_own_registry_and_relabels() -> None:
    first, second = PrometheusMetrics("a"), PrometheusMetrics("b")
    first.record_engine_stats(0, SchedulerStats(num_running=1))
    second.set_model_name("c")
    second.record_engine_stats(0, SchedulerStats(num_running=2))
    assert b'model_name="a"' in first.render() and b'model_name="c"' not in first.render()
    assert b'num_requests_running{engine="0",model_name="c"} 2.0' in second.render()


async def test_http_metrics_use_route_templates() -> None:
    metrics = PrometheusMetrics("m")
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    app.include_router(metrics_router)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.state.metrics = metrics
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for name in ("one", "two"):
            assert (await client.get(f"/items/{name}")).status_code == 200
        assert (await client.get("/missing/path")).status_code == 404
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(metrics)
    key = (("handler", "/items/{item}"), ("method", "GET"), ("status", "200"))
    assert got[("http_requests_total", key)] == 2
    assert (
        got[("http_requests_total", (("handler", "none"), ("method", "GET"), ("status", "404")))]
        == 1
    )
    assert ("http_request_duration_seconds_count", key[:2]) in got


def test_counters_exist_at_zero_from_the_first_engine_report() -> None:
    metrics = PrometheusMetrics("m")
    metrics.record_engine_stats(0, SchedulerStats())
    got = samples(metrics)
    for name in (
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert got[(name, LABELS)] == 0, name
    for reason in ("stop", "length", "abort", "error"):
        assert got[("vllm:request_success_total", labels(finished_reason=reason))] == 0
    metrics.set_model_name("renamed")
    metrics.record_engine_stats(0, SchedulerStats())
    renamed = tuple(sorted({"engine": "0", "model_name": "renamed"}.items()))
    assert samples(metrics)[("vllm:prefix_cache_hits_total", renamed)] == 0

"""PrometheusMetrics: vLLM's names and labels, deltas of cumulative stats, HTTP metrics."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import prometheus_client.metrics
import pytest
from fastapi import FastAPI
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from kubellm.protocol.messages import SchedulerStats
from kubellm.server.metrics import (
    MULTIPROC_ENV,
    TTFT_BUCKETS,
    HttpMetricsMiddleware,
    PrometheusMetrics,
    buckets_1_2_5,
    mark_process_dead,
)
from kubellm.server.metrics import router as metrics_router
from kubellm.server.stats import RequestStats
from kubellm.server.supervisor import api_server_environment


@pytest.fixture(autouse=True)
def _single_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """No multiprocess directory unless a test sets one up."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)


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


def test_a_process_that_does_not_count_engine_totals_still_shows_them_at_zero() -> None:
    metrics = PrometheusMetrics("m", engine_totals=False)
    metrics.record_engine_stats(0, SchedulerStats(num_running=2, prefix_cache_queries=100))
    got = samples(metrics)
    assert got[("vllm:num_requests_running", LABELS)] == 2
    assert got[("vllm:prefix_cache_queries_total", LABELS)] == 0
    assert got[("vllm:num_preemptions_total", LABELS)] == 0


# ------------------------------------------------------------------------- multiprocess mode


class Processes:
    """API server processes simulated in this one, as prometheus_client's own tests do:
    PROMETHEUS_MULTIPROC_DIR names a temp dir, and `values.ValueClass` (which the metrics read
    whenever they create a series) is the mmap-backed class of a fake pid while that
    "process" records. The gauges' "mostrecent" clock is a counter, so the order of writes,
    not the wall clock, decides which is newest."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.monkeypatch = monkeypatch
        self.path = path
        self._classes: dict[int, object] = {}
        clock = itertools.count(1_000)
        monkeypatch.setenv(MULTIPROC_ENV, str(path))
        monkeypatch.setattr(
            prometheus_client.metrics, "time", SimpleNamespace(time=lambda: float(next(clock)))
        )

    def be(self, pid: int) -> None:
        """Record as process `pid` from now on."""
        if pid not in self._classes:
            self._classes[pid] = values.MultiProcessValue(lambda: pid)
        self.monkeypatch.setattr(values, "ValueClass", self._classes[pid])

    def metrics(self, pid: int, *, engine_totals: bool = True) -> PrometheusMetrics:
        self.be(pid)
        metrics = PrometheusMetrics("m", engine_totals=engine_totals)
        assert metrics.multiprocess_dir == str(self.path)
        return metrics


@pytest.fixture
def procs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Processes]:
    yield Processes(monkeypatch, tmp_path)
    values.close_all_multiprocess_files()


def finished(latency: float, prompt: int) -> RequestStats:
    return RequestStats(
        arrival_time=10.0, finish_time=10.0 + latency, num_prompt_tokens=prompt,
        finish_reason="stop",
    )  # fmt: skip


def test_counters_and_histograms_sum_over_the_processes(procs: Processes) -> None:
    first, second = procs.metrics(1), procs.metrics(2)
    procs.be(1)
    first.record_request(finished(latency=1.0, prompt=7))
    first.record_http("POST", "/v1/completions", 200, 0.1)
    procs.be(2)
    second.record_request(finished(latency=3.0, prompt=5))
    second.record_http("POST", "/v1/completions", 200, 0.2)
    assert first.render() == second.render()  # the same view whichever process is scraped
    got = samples(first)
    assert got[("vllm:request_success_total", labels(finished_reason="stop"))] == 2
    assert got[("vllm:prompt_tokens_total", LABELS)] == 12
    assert got[("vllm:e2e_request_latency_seconds_count", LABELS)] == 2
    assert got[("vllm:e2e_request_latency_seconds_sum", LABELS)] == 4.0
    assert got[("vllm:e2e_request_latency_seconds_bucket", labels(le="1.0"))] == 1
    assert got[("vllm:e2e_request_latency_seconds_bucket", labels(le="5.0"))] == 2
    key = (("handler", "/v1/completions"), ("method", "POST"), ("status", "200"))
    assert got[("http_requests_total", key)] == 2
    assert got[("http_request_duration_seconds_count", key[:2])] == 2


def test_engine_gauges_take_the_newest_value_not_the_sum(procs: Processes) -> None:
    first, second = procs.metrics(1), procs.metrics(2)
    heard = SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.5)
    for pid, metrics in ((1, first), (2, second)):  # both hear the same heartbeat
        procs.be(pid)
        metrics.record_engine_stats(0, heard)
    got = samples(first)
    assert got[("vllm:num_requests_running", LABELS)] == 3
    assert got[("vllm:num_requests_waiting", LABELS)] == 1
    assert got[("vllm:kv_cache_usage_perc", LABELS)] == 0.5
    procs.be(2)
    second.record_engine_stats(0, SchedulerStats(num_running=1))
    assert samples(first)[("vllm:num_requests_running", LABELS)] == 1
    procs.be(1)
    first.record_engine_stats(0, SchedulerStats(num_running=4))
    assert samples(second)[("vllm:num_requests_running", LABELS)] == 4


def test_engine_totals_are_counted_once(procs: Processes) -> None:
    counting, other = procs.metrics(1), procs.metrics(2, engine_totals=False)
    for stats in (
        SchedulerStats(num_preemptions=1, prefix_cache_queries=100, prefix_cache_hits=40),
        SchedulerStats(num_preemptions=2, prefix_cache_queries=150, prefix_cache_hits=60),
    ):
        for pid, metrics in ((1, counting), (2, other)):
            procs.be(pid)
            metrics.record_engine_stats(0, stats)
    got = samples(other)
    assert got[("vllm:num_preemptions_total", LABELS)] == 2
    assert got[("vllm:prefix_cache_queries_total", LABELS)] == 150
    assert got[("vllm:prefix_cache_hits_total", LABELS)] == 60


def test_series_exist_at_zero_in_multiprocess_mode(procs: Processes) -> None:
    metrics = procs.metrics(1, engine_totals=False)
    metrics.record_engine_stats(0, SchedulerStats())
    got = samples(metrics)
    assert got[("vllm:prefix_cache_hits_total", LABELS)] == 0
    for reason in ("stop", "length", "abort", "error"):
        assert got[("vllm:request_success_total", labels(finished_reason=reason))] == 0


def test_a_dead_process_loses_its_gauges_and_keeps_its_counts(procs: Processes) -> None:
    survivor, dead = procs.metrics(1), procs.metrics(2)
    procs.be(1)
    survivor.record_engine_stats(0, SchedulerStats(num_running=1))
    procs.be(2)
    dead.record_engine_stats(1, SchedulerStats(num_running=5))
    dead.record_request(finished(latency=1.0, prompt=3))
    engine_1 = tuple(sorted({"engine": "1", "model_name": "m"}.items()))
    assert samples(survivor)[("vllm:num_requests_running", engine_1)] == 5
    mark_process_dead(str(procs.path), 2)
    got = samples(survivor)
    assert ("vllm:num_requests_running", engine_1) not in got
    assert got[("vllm:num_requests_running", LABELS)] == 1
    assert got[("vllm:prompt_tokens_total", LABELS)] == 3  # finished() ran on engine 0


def test_a_multiprocess_dir_that_is_not_a_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"PROMETHEUS_MULTIPROC_DIR=.*missing: no such directory"):
        PrometheusMetrics("m")


def test_a_dir_set_after_prometheus_client_was_imported_falls_back_to_this_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))  # values.ValueClass is per-process here
    with caplog.at_level(logging.WARNING, logger="kubellm.server.metrics"):
        metrics = PrometheusMetrics("m")
    assert metrics.multiprocess_dir is None
    assert "imported before" in caplog.text
    metrics.record_engine_stats(0, SchedulerStats(num_running=2))
    assert samples(metrics)[("vllm:num_requests_running", LABELS)] == 2
    assert list(tmp_path.iterdir()) == []


def test_the_single_shape_uses_its_own_registry() -> None:
    assert PrometheusMetrics("m").multiprocess_dir is None


def test_api_servers_get_the_private_dir_in_their_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("prometheus_multiproc_dir", "/elsewhere")
    monkeypatch.setenv("KUBELLM_TEST_KEPT", "yes")
    env = api_server_environment(str(tmp_path))
    assert env[MULTIPROC_ENV] == str(tmp_path)
    assert "prometheus_multiproc_dir" not in env
    assert env["KUBELLM_TEST_KEPT"] == "yes"

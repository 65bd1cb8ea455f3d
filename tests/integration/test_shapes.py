"""The shapes of `kubellm serve` as real processes (dummy engines): the multi shape's supervisor
and API servers, a head waiting for remote engines, and a headless host without a head.

Cross-host runs (head + headless engines, kills under load) live in the lead's tests."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import RemoteServer, dummy_args, free_port  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def api_server_pids(server: RemoteServer) -> dict[int, int]:
    """client index → pid, from the supervisor's "started API server" lines."""
    found = re.findall(r"started API server (\d+): pid (\d+)", server.log_text())
    return {int(index): int(pid) for index, pid in found}


def descendants(server: RemoteServer) -> list[psutil.Process]:
    assert server.proc is not None
    return psutil.Process(server.proc.pid).children(recursive=True)


def assert_all_gone(processes: list[psutil.Process], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    for p in alive:
        p.kill()
    raise AssertionError(f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}")


def pids_answering(server: RemoteServer, wanted: int, max_requests: int = 300) -> set[int]:
    """Send GET /version on fresh connections until `wanted` distinct API server processes
    have answered (each logs the request with its pid), or `max_requests` were sent."""
    pattern = re.compile(r"\[(\d+)\] uvicorn\.access: .*\"GET /version\?probe=(\d+) HTTP")
    seen: set[int] = set()
    for i in range(max_requests):
        with server.http(timeout=10.0) as http:
            assert http.get(f"/version?probe={i}").status_code == 200
        if i % 10 == 9 or i == max_requests - 1:
            time.sleep(0.2)  # let the access log lines reach the file
            seen = {int(pid) for pid, _ in pattern.findall(server.log_text())}
            if len(seen) >= wanted:
                break
    return seen


def test_two_api_servers_serve_share_the_port_and_drain(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(
        tiny_tokenizer_dir,
        "--api-server-count",
        "2",
        "--shutdown-timeout",
        "30",
        behaviour="token_delay_s=0.05",
    )
    with RemoteServer(args) as server:
        pids = api_server_pids(server)
        assert sorted(pids) == [0, 1]
        assert pids_answering(server, wanted=2) == set(pids.values())
        assert httpx.get(server.url + "/ready").json()["ready"] is True
        client = server.client()
        done = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
        assert done.choices[0].finish_reason == "length"

        children = descendants(server)
        result: dict[str, object] = {}

        def stream() -> None:
            pieces = client.completions.create(
                model="tiny", prompt="drain me", max_tokens=40, stream=True
            )
            for chunk in pieces:
                if chunk.choices and chunk.choices[0].finish_reason:
                    result["finish_reason"] = chunk.choices[0].finish_reason

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)  # the request is in flight (40 tokens at 0.05 s)
        server.terminate()
        reader.join(60)
        assert result.get("finish_reason") == "length"  # drained, not aborted
        assert server.wait(60) == 0
        assert_all_gone(children)
        assert "SIGTERM: stopping 2 API server(s)" in server.log_text()


def test_killing_an_api_server_stops_the_supervisor(tiny_tokenizer_dir: Path) -> None:
    with RemoteServer(dummy_args(tiny_tokenizer_dir, "--api-server-count", "2")) as server:
        pids = api_server_pids(server)
        children = descendants(server)
        assert len(server.engine_processes()) == 1
        psutil.Process(pids[1]).send_signal(signal.SIGKILL)
        assert server.wait(60) == 1
        assert_all_gone(children)
        assert f"API server 1 (pid {pids[1]}) exited with code -9" in server.log_text()


def test_killing_the_supervisor_leaves_nothing_behind(tiny_tokenizer_dir: Path) -> None:
    with RemoteServer(dummy_args(tiny_tokenizer_dir, "--api-server-count", "2")) as server:
        children = descendants(server)
        assert len(children) == 3  # two API servers and one engine
        assert server.proc is not None
        server.proc.kill()
        assert server.wait(10) == -signal.SIGKILL
        assert_all_gone(children)  # parent-death handling in the API servers and the engine


def test_a_head_waiting_for_remote_engines_listens_and_answers_503(
    tiny_tokenizer_dir: Path,
) -> None:
    args = dummy_args(
        tiny_tokenizer_dir,
        "--data-parallel-size",
        "2",
        "--data-parallel-size-local",
        "0",
        "--api-server-count",
        "1",
        "--data-parallel-rpc-port",
        str(free_port()),
    )
    with RemoteServer(args) as server, server.http(timeout=10.0) as http:
        assert http.get("/health").status_code == 200  # liveness does not need engines
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["message"] == "0 of 2 engines ready (need 2)"
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert server.engine_processes() == []


def test_headless_without_a_head_exits_non_zero(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(
        tiny_tokenizer_dir,
        "--headless",
        "--data-parallel-size",
        "2",
        "--data-parallel-start-rank",
        "1",
        "--data-parallel-rpc-port",
        str(free_port()),
        "--registration-timeout-s",
        "2",
    )
    server = RemoteServer(args, wait_healthy=False)
    with server:
        code = server.wait(60)
        log = server.log_text()
    assert code == 1, log
    assert re.search(r"engine 1 exited with code 1: no head at tcp://\S+ accepted", log), log


def test_a_head_with_one_local_engine_serves_once_it_is_ready(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(
        tiny_tokenizer_dir,
        "--data-parallel-size",
        "2",
        "--data-parallel-size-local",
        "1",
        "--api-server-count",
        "1",
        "--min-ready-engines",
        "1",
        "--data-parallel-rpc-port",
        str(free_port()),
        behaviour="startup_delay_s=2",
    )
    with RemoteServer(args) as server, server.http(timeout=10.0) as http:
        log = server.log_text()
        assert log.index("engine ready") < log.index("serving on")  # R1 for the local engine
        ready = http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["engines"] == {"ready": 1, "required": 1, "expected": 2}
        done = server.client().completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert done.choices[0].finish_reason == "length"


def test_sigterm_while_api_servers_wait_for_engines_leaves_nothing(
    tiny_tokenizer_dir: Path,
) -> None:
    args = dummy_args(tiny_tokenizer_dir, "--api-server-count", "2", behaviour="startup_delay_s=30")
    with RemoteServer(args, wait_healthy=False) as server:
        deadline = time.monotonic() + 30
        while len(api_server_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the API servers are up and waiting for the engine
        children = descendants(server)
        assert len(children) == 3, [p.cmdline() for p in children]
        server.terminate()
        assert server.wait(30) == 0, server.log_text()
        assert_all_gone(children)


def test_headless_probes_name_unready_engines_and_sigterm_exits_0(
    tiny_tokenizer_dir: Path,
) -> None:
    args = dummy_args(
        tiny_tokenizer_dir,
        "--headless",
        "--data-parallel-size",
        "2",
        "--data-parallel-start-rank",
        "1",
        "--data-parallel-rpc-port",
        str(free_port()),
    )
    with RemoteServer(args, wait_healthy=False) as server, server.http(timeout=10.0) as http:
        deadline = time.monotonic() + 30
        message = ""
        while "engine 1: registering" not in message and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                response = http.get("/health")
                assert response.status_code == 503
                message = response.json()["error"]["message"]
            time.sleep(0.1)
        assert "engine 1: registering" in message, server.log_text()
        assert http.get("/ready").status_code == 503
        assert (
            'kubellm:engine_state{engine="1",state="registering"} 1.0' in http.get("/metrics").text
        )
        engines = server.engine_processes()
        assert len(engines) == 1
        server.terminate()
        assert server.wait(30) == 0, server.log_text()
        assert_all_gone(engines)


def completion_totals(text: str) -> tuple[float, float]:
    """(vllm:request_success_total summed over its series, POST /v1/completions counted by
    http_requests_total) in a /metrics body."""
    from prometheus_client.parser import text_string_to_metric_families

    success = http = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:request_success_total":
                success += s.value
            elif s.name == "http_requests_total" and s.labels.get("handler") == "/v1/completions":
                http += s.value
    return success, http


def test_two_api_servers_show_one_metrics_view(tiny_tokenizer_dir: Path) -> None:
    completions = 6
    with RemoteServer(dummy_args(tiny_tokenizer_dir, "--api-server-count", "2")) as server:
        pids = api_server_pids(server)
        found = re.search(r"API server metrics in (\S+)", server.log_text())
        assert found, server.log_text()
        metrics_dir = Path(found.group(1))
        assert metrics_dir.stat().st_mode & 0o777 == 0o700
        for _ in range(completions):  # fresh connections: either API server may take each
            with server.http(timeout=10.0) as http:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
                assert http.post("/v1/completions", json=body).status_code == 200
        deadline = time.monotonic() + 10  # the HTTP counter is recorded after the response
        while completion_totals(httpx.get(server.url + "/metrics").text) != (completions,) * 2:
            assert time.monotonic() < deadline, httpx.get(server.url + "/metrics").text
            time.sleep(0.1)
        pattern = re.compile(r"\[(\d+)\] uvicorn\.access: .*\"GET /metrics\?scrape=\d+ HTTP")
        scraped: set[int] = set()
        for i in range(100):  # until both API servers answered a scrape (and at least 6)
            with server.http(timeout=10.0) as http:
                text = http.get(f"/metrics?scrape={i}").text
            assert completion_totals(text) == (completions, completions), text
            if i >= 5 and i % 5 == 0:
                time.sleep(0.2)  # let the access log lines reach the file
                scraped = {int(pid) for pid in pattern.findall(server.log_text())}
                if len(scraped) == 2:
                    break
        assert scraped == set(pids.values())
    assert not metrics_dir.exists()

"""`kubellm serve` lifecycle with the dummy engine: readiness, engine death, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import RemoteServer, dummy_args, engine_pid  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(120)]


def health_status(server: RemoteServer) -> int | None:
    """/health's status, or None when the connection is refused."""
    try:
        with server.http(timeout=2.0) as http:
            return http.get("/health").status_code
    except httpx.TransportError:
        return None


def wait_for(predicate: object, timeout: float, what: str, server: RemoteServer) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout:g} s\n--- log ---\n{server.log_text()}")


def test_health_is_not_200_before_the_engine_is_ready(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, behaviour="startup_delay_s=3")
    with RemoteServer(args, wait_healthy=False) as server:
        # The engine sleeps 3 s before its handshake: for the first second /health must not
        # be 200 (the socket is bound but not listening: connection refused, or 503).
        deadline = time.monotonic() + 1.0
        seen = []
        while time.monotonic() < deadline:
            seen.append(health_status(server))
            time.sleep(0.1)
        assert seen and all(status in (None, 503) for status in seen), seen
        server.wait_until_healthy()
        assert health_status(server) == 200
        log = server.log_text()
        assert log.index("engine ready") < log.index("serving on")


def test_engine_sigkill_makes_health_503_and_the_server_exit_non_zero(
    tiny_tokenizer_dir: Path,
) -> None:
    with RemoteServer(dummy_args(tiny_tokenizer_dir)) as server:
        os.kill(engine_pid(server), signal.SIGKILL)
        # 503 while the watchdog winds down, or already gone (connection refused).
        wait_for(lambda: health_status(server) in (503, None), 10, "/health not 503", server)
        code = server.wait(15)
        assert code is not None, "the server did not exit by itself after the engine died"
        assert code != 0, server.log_text()
        assert "engine died" in server.log_text()


def test_keep_alive_on_engine_death(tiny_tokenizer_dir: Path) -> None:
    env = {"KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}
    with RemoteServer(dummy_args(tiny_tokenizer_dir), env=env) as server:
        os.kill(engine_pid(server), signal.SIGKILL)
        wait_for(lambda: health_status(server) == 503, 10, "/health not 503", server)
        with server.http(timeout=5.0) as http:
            body = http.get("/health").json()
            assert body["error"]["code"] == 503
            for _ in range(6):  # several watchdog intervals (0.5 s)
                time.sleep(0.25)
                assert http.get("/health").status_code == 503
            response = http.post(
                "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
            )
            assert response.status_code >= 500
            assert response.json()["error"]["code"] == response.status_code
        assert server.proc is not None and server.proc.poll() is None


def test_sigterm_during_startup_exits_without_orphans(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, behaviour="startup_delay_s=30")
    with RemoteServer(args, wait_healthy=False) as server:
        wait_for(lambda: bool(server.engine_processes()), 20, "no engine process", server)
        engines = server.engine_processes()
        server.terminate()
        code = server.wait(10)
        assert code is not None, "the server did not exit within 10 s of SIGTERM"
        assert code == 0, server.log_text()
        for engine in engines:
            engine.wait(10)  # raises TimeoutExpired if the engine is left running


def _stream(server: RemoteServer, max_tokens: int, started: threading.Event) -> tuple[str, int]:
    """(finish_reason, number of text chunks) of one streamed completion."""
    stream = server.client(max_retries=0, timeout=60).completions.create(
        model="tiny", prompt="hello", max_tokens=max_tokens, stream=True
    )
    chunks, finish = 0, ""
    for chunk in stream:
        started.set()
        for choice in chunk.choices:
            chunks += 1
            finish = choice.finish_reason or finish
    return finish, chunks


def _start_streams(
    server: RemoteServer, pool: ThreadPoolExecutor, count: int, max_tokens: int
) -> list[Future[tuple[str, int]]]:
    events = [threading.Event() for _ in range(count)]
    futures = [pool.submit(_stream, server, max_tokens, e) for e in events]
    for event in events:
        assert event.wait(30), server.log_text()
    return futures


def _new_request_refused(server: RemoteServer) -> bool:
    try:
        with server.http(timeout=5.0) as http:
            response = http.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
            )
    except httpx.TransportError:
        return True
    return response.status_code == 503 and response.json()["error"]["code"] == 503


def test_sigterm_drains_in_flight_streams(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, "--shutdown-timeout", "15", behaviour="token_delay_s=0.1")
    with RemoteServer(args) as server, ThreadPoolExecutor(4) as pool:
        futures = _start_streams(server, pool, 3, max_tokens=25)  # ~2.5 s each
        server.terminate()
        time.sleep(0.3)
        assert _new_request_refused(server)
        assert health_status(server) in (503, None)
        for future in futures:
            finish, _chunks = future.result(timeout=30)
            assert finish == "length"
        code = server.wait(20)
        assert code == 0, server.log_text()


def test_zero_shutdown_timeout_aborts_in_flight_streams(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, "--shutdown-timeout", "0", behaviour="token_delay_s=0.05")
    with RemoteServer(args) as server, ThreadPoolExecutor(2) as pool:
        futures = _start_streams(server, pool, 2, max_tokens=400)  # ~20 s if not aborted
        started = time.monotonic()
        server.terminate()
        code = server.wait(10)
        assert code is not None, "no quick exit with --shutdown-timeout 0"
        assert code == 0, server.log_text()
        assert time.monotonic() - started < 10
        for future in futures:
            try:
                finish, _chunks = future.result(timeout=10)
            except Exception:  # the connection ended: also an acceptable way to fail a stream
                continue
            assert finish == "abort"


def test_engine_startup_failure_exits_non_zero_quickly(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, behaviour="startup_fail=true")
    with RemoteServer(args, wait_healthy=False) as server:
        code = server.wait(30)
        assert code is not None and code != 0, server.log_text()
        assert "the engine failed to start" in server.log_text()

"""Listening (UDS, --port 0, IPv6) and HTTP hygiene: auth, limits, CORS, request ids, user
middleware and /metrics, against a real `kubellm serve` with the dummy engine."""

from __future__ import annotations

import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RemoteServer, dummy_args  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(120)]

API_KEY = "sk-test-key"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def guarded(tiny_tokenizer_dir: Path) -> Iterator[RemoteServer]:
    """One server with auth, request ids, CORS, small limits and two user middlewares."""
    args = dummy_args(
        tiny_tokenizer_dir,
        "--api-key", API_KEY,
        "--enable-request-id-headers",
        "--allowed-origins", "https://example.com",
        "--max-request-body-bytes", "4096",
        "--middleware", "kubellm_test_middleware:add_function_header",
        "kubellm_test_middleware:AddClassHeader",
    )  # fmt: skip
    with RemoteServer(args, env={"PYTHONPATH": str(HERE)}) as server:
        yield server


def authed(server: RemoteServer) -> httpx.Client:
    return server.http(timeout=10.0, headers={"Authorization": f"Bearer {API_KEY}"})


def raw_request(server: RemoteServer, request: bytes) -> bytes:
    """Send bytes as they are and return the response head (status line and headers)."""
    with socket.create_connection((server.host, server.port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_api_key_required_on_the_api_but_not_on_probes(guarded: RemoteServer) -> None:
    with guarded.http(timeout=10.0) as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401
        assert missing.json()["error"] == {
            "message": "Invalid or missing API key.",
            "type": "AuthenticationError",
            "param": None,
            "code": 401,
        }
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401
        assert http.get("/health").status_code == 200
        assert http.get("/version").status_code == 200
    with authed(guarded) as http:
        assert http.get("/v1/models").status_code == 200
    models = guarded.client(api_key=API_KEY).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_host_header_trick_is_still_401(guarded: RemoteServer) -> None:
    head = raw_request(
        guarded, b"GET /v1/models HTTP/1.1\r\nHost: x/health?\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 401"), head[:200]


def test_huge_header_is_431_and_the_server_stays_healthy(guarded: RemoteServer) -> None:
    with guarded.http(timeout=10.0) as http:
        response = http.get("/health", headers={"x-big": "a" * 200 * 1024})
        assert response.status_code == 431
        assert response.json()["error"]["code"] == 431
        assert http.get("/health").status_code == 200


def test_too_many_headers_is_431(guarded: RemoteServer) -> None:
    headers = [(f"x-h-{i}", "v") for i in range(1000)]
    with guarded.http(timeout=10.0) as http:
        assert http.get("/health", headers=headers).status_code == 431


def test_body_over_the_limit_is_413(guarded: RemoteServer) -> None:
    body = b'{"model": "tiny", "prompt": "' + b"a" * 8000 + b'", "max_tokens": 1}'
    with authed(guarded) as http:
        declared = http.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        streamed = http.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
    with guarded.http(timeout=10.0) as http:
        assert http.get("/health").status_code == 200


def test_cors_preflight(guarded: RemoteServer) -> None:
    with guarded.http(timeout=10.0) as http:
        response = http.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://example.com"
    assert "POST" in response.headers["access-control-allow-methods"]


def test_request_id_is_echoed_or_created(guarded: RemoteServer) -> None:
    with guarded.http(timeout=10.0) as http:
        echoed = http.get("/health", headers={"X-Request-Id": "req-123"})
        assert echoed.headers["x-request-id"] == "req-123"
        created = http.get("/health")
        assert re.fullmatch(r"[0-9a-f]{32}", created.headers["x-request-id"])


def test_user_middleware_adds_headers(guarded: RemoteServer) -> None:
    with authed(guarded) as http:
        response = http.get("/v1/models")
    assert response.headers["x-user-function"] == "1"
    assert response.headers["x-user-class"] == "1"


def test_metrics_expose_vllm_names_after_a_completion(guarded: RemoteServer) -> None:
    completion = guarded.client(api_key=API_KEY).completions.create(
        model="tiny", prompt="hello", max_tokens=3
    )
    assert completion.choices[0].finish_reason == "length"
    with guarded.http(timeout=10.0) as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    labels = 'engine="0",model_name="tiny"'
    success = 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"}'
    assert success in text
    assert f"vllm:generation_tokens_total{{{labels}}}" in text
    assert f"vllm:num_requests_running{{{labels}}}" in text
    assert "vllm:time_to_first_token_seconds_bucket" in text
    assert 'http_requests_total{handler="/v1/completions",method="POST",status="200"}' in text


def test_uds_listen(tiny_tokenizer_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "kubellm.sock")
        Path(path).touch()  # not a socket: refused rather than deleted
        with RemoteServer(dummy_args(tiny_tokenizer_dir), uds=path, wait_healthy=False) as bad:
            assert bad.wait(30) == 1
            assert "exists and is not a socket" in bad.log_text()
        Path(path).unlink()
        with RemoteServer(dummy_args(tiny_tokenizer_dir), uds=path) as server:
            with server.http(timeout=10.0) as http:
                assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
            assert f"unix:{path}" in server.log_text()
        assert not Path(path).exists(), "the socket file was not removed on exit"


def test_port_zero_logs_the_real_port(tiny_tokenizer_dir: Path) -> None:
    with RemoteServer(dummy_args(tiny_tokenizer_dir), port=0) as server:
        assert server.port != 0
        assert f"serving on http://127.0.0.1:{server.port}" in server.log_text()
        with server.http(timeout=10.0) as http:
            assert http.get("/health").status_code == 200


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen(tiny_tokenizer_dir: Path) -> None:
    with RemoteServer(dummy_args(tiny_tokenizer_dir), host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        assert f"serving on http://[::1]:{server.port}" in server.log_text()
        assert [m.id for m in server.client().models.list().data] == ["tiny"]

"""Bad input against a real `kubellm serve` (dummy engine): each request gets a 4xx with an
OpenAI error body, and afterwards the server is healthy and serves a good request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RemoteServer, dummy_args  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_MODEL_LEN = 64
USER = [{"role": "user", "content": "hello"}]

CASES: list[tuple[str, str, Any, int, str]] = [
    # (id, path, body (str: raw bytes), status, substring of the message)
    ("malformed-json", "/v1/completions", '{"model": "tiny", "prompt": ', 400, "JSON"),
    ("body-not-object", "/v1/chat/completions", "[1, 2]", 400, ""),
    ("prompt-wrong-type", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    (
        "max-tokens-string",
        "/v1/completions",
        {"prompt": "x", "max_tokens": "lots"},
        400,
        "max_tokens",
    ),
    (
        "temperature-string",
        "/v1/chat/completions",
        {"messages": USER, "temperature": "hot"},
        400,
        "temperature",
    ),
    ("messages-wrong-type", "/v1/chat/completions", {"messages": [1, 2]}, 400, "messages"),
    (
        "negative-max-tokens",
        "/v1/completions",
        {"prompt": "x", "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "zero-max-tokens",
        "/v1/chat/completions",
        {"messages": USER, "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "huge-max-tokens",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 10**9},
        400,
        "maximum context length",
    ),
    (
        "prompt-too-long",
        "/v1/completions",
        {"prompt": "word " * 200},
        400,
        "maximum context length",
    ),
    (
        "token-prompt-too-long",
        "/v1/completions",
        {"prompt": [5] * 100},
        400,
        "maximum context length",
    ),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 10**7]}, 400, "vocabulary"),
    (
        "unknown-model",
        "/v1/completions",
        {"model": "gpt-5", "prompt": "x"},
        404,
        "The model `gpt-5` does not exist.",
    ),
    (
        "unknown-model-chat",
        "/v1/chat/completions",
        {"model": "gpt-5", "messages": USER},
        404,
        "does not exist",
    ),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "empty"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "empty"),
    (
        "image-part",
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                }
            ]
        },
        400,
        "not supported",
    ),
    ("n-too-large", "/v1/completions", {"prompt": "x", "n": 10**6}, 400, "n must be"),
    (
        "min-tokens-over-max",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 2, "min_tokens": 5},
        400,
        "min_tokens",
    ),
    ("top-p-zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (
        "reserved-template-kwarg",
        "/v1/chat/completions",
        {"messages": USER, "chat_template_kwargs": {"bos_token": "x"}},
        400,
        "bos_token",
    ),
    (
        "response-format",
        "/v1/chat/completions",
        {"messages": USER, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
]


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir: Path) -> Iterator[RemoteServer]:
    args = dummy_args(tiny_tokenizer_dir, "--max-model-len", str(MAX_MODEL_LEN))
    with RemoteServer(args) as remote:
        yield remote


@pytest.fixture(scope="module")
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with server.http(timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "status", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(http: httpx.Client, path: str, body: Any, status: int, match: str) -> None:
    if isinstance(body, str):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and match in error["message"]
    assert len(error["message"]) < 2100  # never echoes a large body back
    # the server is still healthy and serves a good request
    assert http.get("/health").status_code == 200
    good = http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"

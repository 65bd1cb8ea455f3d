"""The OpenAI API of a real `kubellm serve` subprocess with the dummy engine, driven by the
official `openai` client: completions and chat, streaming or not, usage, n, logprobs, stop
strings and stop token ids, /tokenize, /detokenize, /v1/models, and a mid-stream engine death.

The dummy engine's tokens depend only on the prompt and the position, so the expected text is
computed here from `kubellm.engine.dummy.dummy_token` and the tiny tokenizer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import RemoteServer, dummy_args  # type: ignore[import-not-found, unused-ignore]
from openai.types.chat import ChatCompletionMessageParam

from kubellm.engine.dummy import dummy_token
from kubellm.server.tokenizer import Tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_MODEL_LEN = 256
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir: Path) -> Iterator[RemoteServer]:
    args = dummy_args(tiny_tokenizer_dir, "--max-model-len", str(MAX_MODEL_LEN))
    with RemoteServer(args) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client(max_retries=0)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def expected_ids(prompt_ids: list[int], count: int) -> list[int]:
    return [dummy_token(prompt_ids, len(prompt_ids) + i) for i in range(count)]


def expected_text(tok: Tokenizer, prompt: str, count: int) -> str:
    return tok.decode(expected_ids(tok.encode(prompt), count))


def test_models(client: openai.OpenAI, tiny_tokenizer_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "kubellm"
    extra = models[0].model_extra or {}
    assert extra["max_model_len"] == MAX_MODEL_LEN
    assert Path(extra["root"]).resolve() == tiny_tokenizer_dir.resolve()


def test_completion(client: openai.OpenAI, tok: Tokenizer) -> None:
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6)
    assert out.id.startswith("cmpl-")
    assert out.choices[0].text == expected_text(tok, "Hello there", 6)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(tok.encode("Hello there")),
        6,
    )


def test_completion_stream_with_usage(client: openai.OpenAI, tok: Tokenizer) -> None:
    stream = client.completions.create(
        model="tiny",
        prompt="Stream me",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(tok, "Stream me", 8)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) <= {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_chat(client: openai.OpenAI, tok: Tokenizer) -> None:
    messages = HI
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    rendered = tok.apply_chat_template(tok.chat_template or "", [dict(m) for m in messages])
    prompt_ids = tok.encode(rendered, add_special_tokens=False)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tok.decode(expected_ids(prompt_ids, 5))
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt_ids)


def test_chat_stream(client: openai.OpenAI) -> None:
    messages = HI
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == (
        whole.choices[0].message.content
    )
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == (
        whole.usage.total_tokens if whole.usage else -1
    )


def test_n_choices(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="two", max_tokens=4, n=2)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 8


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="lp", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.top_logprobs is not None and all(len(t) >= 1 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "lp"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content is not None and len(content) == 3
    assert all(len(e.top_logprobs) == 2 and e.bytes for e in content)
    assert "".join(e.token for e in content) == chat.choices[0].message.content


def _finished(server: RemoteServer) -> dict[str, float]:
    """vllm:request_success_total by finished_reason."""
    with server.http(timeout=10) as http:
        text = http.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            reason = line.split('finished_reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_stop_string(server: RemoteServer, client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="stop", max_tokens=20).choices[0].text
    stop = full[6:9]
    cut = full.find(stop)
    before = _finished(server)
    out = client.completions.create(model="tiny", prompt="stop", max_tokens=20, stop=[stop])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert (out.choices[0].model_extra or {})["stop_reason"] == stop
    after = _finished(server)
    # The engine request was aborted to stop it, but the request finished with "stop".
    assert after["stop"] == before.get("stop", 0) + 1
    assert after["abort"] == before.get("abort", 0)


def test_stop_token_id(client: openai.OpenAI, tok: Tokenizer) -> None:
    ids = expected_ids(tok.encode("ids"), 5)
    out = client.completions.create(
        model="tiny", prompt="ids", max_tokens=20, extra_body={"stop_token_ids": [ids[2]]}
    )
    assert out.choices[0].finish_reason == "stop"
    assert (out.choices[0].model_extra or {})["stop_reason"] == ids[2]
    assert out.choices[0].text == tok.decode(ids[:2])
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_tokenize_and_detokenize(server: RemoteServer, tok: Tokenizer) -> None:
    with server.http(timeout=10) as http:
        data = http.post("/tokenize", json={"model": "tiny", "prompt": "héllo 漢"}).json()
        assert data["tokens"] == tok.encode("héllo 漢")
        assert data["count"] == len(data["tokens"]) and data["max_model_len"] == MAX_MODEL_LEN
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
        assert tok.decode(chat.json()["tokens"], False) == "<|user|>\nx</s>\n<|assistant|>\n"
        back = http.post("/detokenize", json={"tokens": data["tokens"]}).json()
        assert back == {"prompt": "héllo 漢"}


def test_engine_death_mid_stream(tiny_tokenizer_dir: Path) -> None:
    """R7: exactly one error event, then [DONE]; every event is valid JSON."""
    args = dummy_args(tiny_tokenizer_dir, behaviour="crash_after_tokens=3")
    with RemoteServer(args) as remote, remote.http(timeout=30) as http:
        body = {"model": "tiny", "prompt": "crash", "max_tokens": 50, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert all(e.startswith("data: ") for e in events)
        payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        errors = [p for p in payloads if "error" in p]
        assert len(errors) == 1 and payloads[-1] is errors[0]
        assert errors[0]["error"]["code"] == 500
        assert set(errors[0]["error"]) == {"message", "type", "param", "code"}


def test_client_disconnect_ends_the_request(tiny_tokenizer_dir: Path) -> None:
    """A streaming client that goes away stops its request: /load drops back to 0 long before
    the 1000 slow tokens it asked for could have been generated."""
    args = dummy_args(tiny_tokenizer_dir, behaviour="token_delay_s=0.05")
    with RemoteServer(args) as remote, remote.http(timeout=30) as http:
        body = {"model": "tiny", "prompt": "slow", "max_tokens": 1000, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = [next(lines) for _ in range(3)]
            assert all(not line or line.startswith("data: {") for line in first)
            assert http.get("/load").json()["server_load"] == 1
        deadline = time.monotonic() + 10
        while http.get("/load").json()["server_load"] != 0:
            assert time.monotonic() < deadline, "the request was still running 10 s later"
            time.sleep(0.1)
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200

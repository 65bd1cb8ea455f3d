"""The OpenAI API surface in-process: request models, validation (R18) and the serving logic,
driven by the official `openai` client over an ASGI transport against a scripted fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, cast

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse
from test_tokenizer import build_tokenizer_dir  # type: ignore[import-not-found, unused-ignore]

from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    EngineCompat,
    EngineFacts,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from kubellm.protocol.settings import FrontendSettings, ServeSettings
from kubellm.server import handlers
from kubellm.server.errors import EngineDeadError, EngineGenerateError
from kubellm.server.openai.chat import create_chat_completion
from kubellm.server.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    UsageInfo,
)
from kubellm.server.routes import models, tokenize
from kubellm.server.routes import openai as openai_routes
from kubellm.server.state import ServerState
from kubellm.server.stats import NullStatsSink, RequestStats
from kubellm.server.tokenizer import Tokenizer

MAX_MODEL_LEN = 128
SCRIPT = " Paris is nice. STOP here and then some more text that goes on and on"


# ---- request models ------------------------------------------------------------------------


def test_completion_request_accepts_client_fields_and_ignores_unknown() -> None:
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "stream": True, "metadata": {"x": 1}, "store": False}
    )
    assert req.max_tokens == 16 and req.prompts() == ["hi"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"suffix": "x"}, "suffix is not supported"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stop": ["x"] * 100}, "stop strings"),
        ({"top_k": 10**30}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"min_p": float("nan")}, "min_p"),
    ],
)
def test_completion_request_rejects(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CompletionRequest.model_validate({"prompt": "hi", **body})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            {"content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
            "not supported",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"chat_template_kwargs": {"messages": []}}, "may not set messages"),
        ({"chat_template_kwargs": {"k": "x" * 20000}}, "limited"),
        ({"logprobs": False, "top_logprobs": 2}, "requires logprobs"),
        ({"continue_final_message": True}, "cannot both be true"),
    ],
)
def test_chat_request_rejects(body: dict[str, Any], match: str) -> None:
    message = {"role": "user", "content": body.pop("content", "hi")}
    with pytest.raises(ValidationError, match=match):
        ChatCompletionRequest.model_validate({"messages": [message], **body})


def test_chat_text_parts_are_flattened() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 9,
        }
    )
    assert req.messages[0].for_template() == {"role": "user", "content": "a\nb"}
    assert req.messages[1].for_template()["content"] == ""
    assert req.requested_max_tokens == 5


def test_response_shapes() -> None:
    assert "prompt_tokens_details" not in UsageInfo.build(3, 2, 0).model_dump()
    assert UsageInfo.build(3, 2, 1).model_dump()["prompt_tokens_details"] == {"cached_tokens": 1}
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    chunk = ChatCompletionChunk.model_validate(
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    )
    data = chunk.model_dump(mode="json")
    assert data["choices"][0]["finish_reason"] is None
    openai.types.chat.ChatCompletionChunk.model_validate(data)


# ---- serving with a fake engine ------------------------------------------------------------


class FakeEngine:
    """Yields the tokens of SCRIPT one per output; records requests and early closes."""

    def __init__(self, tok: Tokenizer) -> None:
        self.script = tok.encode(SCRIPT, add_special_tokens=False)
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.closed_early: list[str] = []
        self.die_after: int | None = None
        self.fail_after: int | None = None
        self.facts: EngineFacts | None = None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        arrival_time: float,
        stats: RequestStats | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((request_id, list(prompt_token_ids), sampling))
        count = min(sampling.max_tokens, len(self.script))
        done = False
        try:
            for i, token in enumerate(self.script[:count]):
                if self.die_after is not None and i >= self.die_after:
                    raise EngineDeadError("engine core died")
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineGenerateError("this request failed")
                lp = None
                if sampling.logprobs is not None:
                    top = tuple(TokenLogprob(token + k, -1.0 - k) for k in range(sampling.logprobs))
                    lp = (PositionLogprobs(TokenLogprob(token, -0.5), top),)
                await asyncio.sleep(0)  # one token per event loop turn, like a real engine
                last = i == count - 1
                done = last
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=(token,),
                    new_logprobs=lp,
                    finish_reason="length" if last else None,
                    num_prompt_tokens=len(prompt_token_ids),
                )
        finally:
            if not done:
                self.closed_early.append(request_id)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def engine(tok: Tokenizer) -> FakeEngine:
    return FakeEngine(tok)


@pytest.fixture
def state(tok: Tokenizer, engine: FakeEngine) -> ServerState:
    facts = EngineFacts(
        engine_index=0,
        incarnation=1,
        compat=EngineCompat(
            protocol_version=PROTOCOL_VERSION,
            revision="test",
            model_digest="0",
            max_model_len=None,
            dtype="float32",
            engine_backend="dummy",
        ),
        host="test",
        model="/models/tiny",
        max_model_len=MAX_MODEL_LEN,
        supported_tasks=("generate",),
        num_kv_blocks=64,
        block_size=16,
        max_num_seqs=8,
        vocab_size=tok.vocab_size,
        eos_token_ids=(tok.eos_token_id or 0,),
        device="cpu",
        dtype="float32",
        pid=1,
    )
    engine.facts = facts
    return ServerState(
        settings=ServeSettings(frontend=FrontendSettings(max_n=4, max_logprobs=5)),
        engine=cast(Any, engine),
        tokenizer=tok,
        served_model_names=("tiny", "alias"),
        supported_tasks=("generate",),
        stats=NullStatsSink(),
        chat_template=tok.chat_template,
    )


@pytest.fixture
def app(state: ServerState) -> FastAPI:
    app = FastAPI()
    for router in (openai_routes.router, tokenize.router, models.router):
        app.include_router(router)
    handlers.install_exception_handlers(app)
    app.state.kubellm = state
    return app


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client (which speaks httpx2) over an in-process ASGI transport."""
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http:
        yield openai.AsyncOpenAI(
            api_key="x", base_url="http://test/v1", http_client=http, max_retries=0
        )


def script_text(tok: Tokenizer, engine: FakeEngine, n: int) -> str:
    return tok.decode(engine.script[:n])


async def test_completion(client: openai.AsyncOpenAI, tok: Tokenizer, engine: FakeEngine) -> None:
    out = await client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
    assert out.id.startswith("cmpl-") and out.model == "tiny"
    assert out.choices[0].text == script_text(tok, engine, 5)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(tok.encode("Hello"))
    assert engine.requests[0][1] == tok.encode("Hello")


async def test_stop_string_ends_the_engine_request(
    client: openai.AsyncOpenAI, engine: FakeEngine
) -> None:
    out = await client.completions.create(model="tiny", prompt="Hi", max_tokens=40, stop=["STOP"])
    choice = out.choices[0]
    assert choice.text == " Paris is nice. "
    assert choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == "STOP"
    assert engine.closed_early == [engine.requests[0][0]]


async def test_completion_echo_and_token_prompt(
    client: openai.AsyncOpenAI, tok: Tokenizer, engine: FakeEngine
) -> None:
    ids = tok.encode("Le café", add_special_tokens=False)
    out = await client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True)
    assert out.choices[0].text == "Le café" + script_text(tok, engine, 3)
    assert engine.requests[0][1] == ids


async def test_completion_logprobs(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    out = await client.completions.create(model="tiny", prompt="Hi", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.token_logprobs == [-0.5] * 4
    assert lp.top_logprobs is not None and all(len(t) >= 2 for t in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset[1] == len(lp.tokens[0])


async def test_n_fans_out_with_seeds(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    out = await client.completions.create(model="tiny", prompt="Hi", max_tokens=3, n=2, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1]
    ids = sorted(r[0] for r in engine.requests)
    assert ids == [f"{out.id}-0", f"{out.id}-1"]
    assert sorted(r[2].seed or 0 for r in engine.requests) == [7, 8]
    assert out.usage is not None and out.usage.completion_tokens == 6


async def test_chat(client: openai.AsyncOpenAI, tok: Tokenizer, engine: FakeEngine) -> None:
    out = await client.chat.completions.create(
        model="alias", messages=[{"role": "user", "content": "Hi"}], max_tokens=6
    )
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == script_text(tok, engine, 6)
    rendered = tok.apply_chat_template(tok.chat_template or "", [{"role": "user", "content": "Hi"}])
    assert engine.requests[0][1] == tok.encode(rendered, add_special_tokens=False)


async def test_chat_stream_with_usage_and_logprobs(
    client: openai.AsyncOpenAI, tok: Tokenizer, engine: FakeEngine
) -> None:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == script_text(tok, engine, 5)
    entries = [
        e for c in content if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(
        bytes(e.bytes or []) == tok.token_bytes(t)
        for e, t in zip(entries, engine.script, strict=False)
    )
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 5


async def test_mid_stream_engine_death(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.die_after = 3
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 20, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        events = [line async for line in resp.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    assert len(errors) == 1 and payloads[-1] is errors[0]
    assert errors[0]["error"]["code"] == 500
    assert sum(1 for p in payloads if "choices" in p) >= 1


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        (
            "/v1/completions",
            {"model": "nope", "prompt": "x"},
            404,
            "The model `nope` does not exist.",
        ),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": "x " * 200}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": []}, 400, "empty"),
        ("/v1/completions", {"prompt": [10**6]}, 400, "out of vocabulary"),
        ("/v1/completions", {"prompt": "x", "n": 5}, 400, "n must be"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 17}, 400, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "out of vocabulary"),
        ("/v1/chat/completions", {"messages": []}, 400, "empty"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": None,
                "min_tokens": 10**5,
            },
            400,
            "min_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 6, "logprobs": True},
            400,
            "top_logprobs",
        ),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "does not exist"),
        (
            "/tokenize",
            {
                "messages": [{"role": "user", "content": "x"}],
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
            400,
            "cannot both be true",
        ),
        ("/detokenize", {"tokens": [10**6]}, 400, "out of vocabulary"),
    ],
)
async def test_bad_requests_never_reach_the_engine(
    http: httpx.AsyncClient,
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    status: int,
    match: str,
) -> None:
    resp = await http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert match in error["message"] and error["code"] == status
    if status == 404:
        assert error["type"] == "NotFoundError"
    assert engine.requests == []


async def test_tokenize_detokenize_and_models(http: httpx.AsyncClient, tok: Tokenizer) -> None:
    resp = await http.post("/tokenize", json={"prompt": "Le café"})
    data = resp.json()
    assert data["tokens"] == tok.encode("Le café") and data["count"] == len(data["tokens"])
    assert data["max_model_len"] == MAX_MODEL_LEN
    chat = await http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert tok.decode(chat.json()["tokens"], False).endswith("<|im_start|>assistant\n")
    back = await http.post("/detokenize", json={"tokens": data["tokens"]})
    assert back.json() == {"prompt": "Le café"}
    listed = (await http.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["tiny", "alias"]
    assert listed["data"][0]["root"] == "/models/tiny"
    assert listed["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert (await http.get("/v1/models/nope")).status_code == 404


async def test_chat_continue_final_message_with_echo(
    client: openai.AsyncOpenAI, tok: Tokenizer, engine: FakeEngine
) -> None:
    out = await client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "The answer is"},
        ],
        max_tokens=3,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    prompt = tok.decode(engine.requests[0][1], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\nThe answer is")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "The answer is" + script_text(tok, engine, 3)


class _FakeRequest:
    """Enough of a Starlette Request for `cancel_on_disconnect`."""

    def __init__(self, disconnect: asyncio.Event) -> None:
        self.disconnect = disconnect
        self.url = httpx.URL("http://test/v1/completions")

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


async def test_non_streaming_request_is_cancelled_when_the_client_leaves() -> None:
    gone, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> Response:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response()

    async def leave() -> None:
        await asyncio.sleep(0.01)
        gone.set()

    leaving = asyncio.create_task(leave())
    resp = await asyncio.wait_for(
        openai_routes.cancel_on_disconnect(cast(Any, _FakeRequest(gone)), work()),
        timeout=10,
    )
    await leaving
    assert cancelled.is_set() and resp.status_code == openai_routes.CLIENT_CLOSED_REQUEST


async def test_finished_work_is_returned_while_the_client_stays() -> None:
    async def work() -> Response:
        return Response(b"done")

    resp = await openai_routes.cancel_on_disconnect(
        cast(Any, _FakeRequest(asyncio.Event())), work()
    )
    assert resp.body == b"done"


@pytest.mark.parametrize("n", [1, 2])
async def test_stream_closed_by_the_client_aborts_engine_requests(
    state: ServerState, engine: FakeEngine, n: int
) -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "n": n}
    )
    resp = await create_chat_completion(state, req)
    assert isinstance(resp, StreamingResponse)
    body = cast(AsyncGenerator[str, None], resp.body_iterator)
    events = [await anext(body) for _ in range(n + 2)]  # role chunks, then content
    assert all(str(e).startswith("data: {") for e in events)
    assert state.server_load == 1
    await body.aclose()
    assert sorted(engine.closed_early) == sorted(r[0] for r in engine.requests)
    assert len(engine.requests) == n and state.server_load == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_engine_failure_without_streaming_is_a_500(
    http: httpx.AsyncClient, engine: FakeEngine, state: ServerState, path: str
) -> None:
    engine.fail_after = 2
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "n": 2}
    resp = await http.post(path, json=body)
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "InternalServerError"
    assert len(engine.closed_early) == 2 and state.server_load == 0

"""POST /v1/chat/completions: render the chat template, fan out n, answer as JSON or SSE."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.responses import JSONResponse, Response

from kubellm.protocol.messages import PositionLogprobs
from kubellm.server.errors import OpenAIError
from kubellm.server.openai import validate
from kubellm.server.openai.generate import (
    ChoiceDelta,
    ChoiceSpec,
    EventStreamResponse,
    consume,
    log_request,
    run_choice,
    sse_event,
    sse_stream,
)
from kubellm.server.openai.protocol import (
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    TokenLogprobContent,
    TopLogprob,
    UsageInfo,
)
from kubellm.server.state import ServerState
from kubellm.server.tokenizer import ChatTemplateError, Tokenizer


class ChatPrompt(Protocol):
    """What renders a chat prompt: /v1/chat/completions and /tokenize requests both have it."""

    messages: list[ChatMessage]
    add_generation_prompt: bool
    continue_final_message: bool
    tools: list[dict[str, Any]] | None
    chat_template_kwargs: dict[str, Any] | None


def render_chat(state: ServerState, req: ChatPrompt) -> str:
    """The prompt text for the request's messages; template errors are its fault (400)."""
    messages = req.messages
    if req.continue_final_message and req.add_generation_prompt:
        raise OpenAIError(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    if not messages:
        raise OpenAIError("messages must not be empty", param="messages")
    if state.chat_template is None:
        raise OpenAIError(
            "This model has no chat template; start the server with --chat-template.",
            param="messages",
        )
    rendered = [m.for_template() for m in messages]
    try:
        text = state.tokenizer.apply_chat_template(
            state.chat_template,
            rendered,
            add_generation_prompt=req.add_generation_prompt,
            tools=req.tools,
            **(req.chat_template_kwargs or {}),
        )
    except ChatTemplateError as e:
        raise OpenAIError(str(e), param="messages") from e
    if req.continue_final_message:
        text = _cut_after_final_message(text, rendered[-1]["content"])
    return text


def _cut_after_final_message(text: str, content: str) -> str:
    """Drop what the template appended after the final message (its end-of-turn tokens), so
    that the model continues that message."""
    needle = content.strip()
    if not needle:
        return text
    at = text.rfind(needle)
    if at < 0:
        raise OpenAIError(
            "continue_final_message: the chat template does not render the final message "
            "content verbatim",
            param="continue_final_message",
        )
    return text[: at + len(needle)]


async def encode_chat(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """The template already has the BOS, so special tokens are not added by default."""
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    cached: int = 0
    logprobs: list[TokenLogprobContent] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _response_role(state: ServerState, req: ChatCompletionRequest) -> str:
    if req.continue_final_message:
        return req.messages[-1].role
    return state.settings.frontend.response_role


def _echo_text(req: ChatCompletionRequest, role: str) -> str:
    """With echo, the last message's content is prepended when its role is the response's."""
    if req.echo and req.messages and req.messages[-1].role == role:
        return req.messages[-1].text()
    return ""


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest) -> Response:
    """Validate everything first (4xx before the engine sees anything), then generate."""
    arrival_time = time.time()
    validate.check_model(state, req.model)
    validate.check_n(state, req.num_choices)
    validate.check_logprobs(state, req.top_logprobs, "top_logprobs")
    validate.check_max_tokens_given(req.requested_max_tokens)
    prompt_text = render_chat(state, req)
    prompt_ids = await encode_chat(state.tokenizer, prompt_text, req.add_special_tokens)
    validate.check_prompt(state, prompt_ids, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    specs = _specs(state, req, request_id, prompt_ids)
    log_request(state, request_id, specs, prompt_text)
    role = _response_role(state, req)
    choices = [_ChoiceState() for _ in specs]
    streams = [run_choice(state, s, arrival_time) for s in specs]
    if req.stream:
        body = _stream(state, req, request_id, role, len(prompt_ids), choices, streams)
        return EventStreamResponse(body)
    async with consume(state, streams) as deltas:
        async for delta in deltas:
            _absorb(state, req, choices[delta.index], delta)
    echo = _echo_text(req, role)
    response = ChatCompletionResponse(
        id=request_id,
        model=state.model_name,
        choices=[_final_choice(i, c, role, echo, req) for i, c in enumerate(choices)],
        usage=_usage(len(prompt_ids), choices),
    )
    return JSONResponse(response.model_dump(mode="json"))


def _specs(
    state: ServerState, req: ChatCompletionRequest, request_id: str, prompt_ids: list[int]
) -> list[ChoiceSpec]:
    max_tokens = validate.resolve_max_tokens(
        state, len(prompt_ids), req.requested_max_tokens, where="messages"
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    n = req.num_choices
    return [
        ChoiceSpec(
            index=i,
            request_id=f"{request_id}-{i}",
            prompt_token_ids=prompt_ids,
            sampling=validate.build_sampling(
                state,
                req,
                max_tokens=max_tokens,
                logprobs=logprobs,
                seed=validate.choice_seed(req.seed, i),
            ),
            stop=req.stop_strings,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            n_param=n,
        )
        for i in range(n)
    ]


def _token_logprobs(
    state: ServerState, positions: list[PositionLogprobs], top_k: int
) -> list[TokenLogprobContent]:
    tok = state.tokenizer

    def entry(token_id: int, logprob: float) -> TopLogprob:
        data = tok.token_bytes(token_id)
        return TopLogprob(
            token=data.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(data)
        )

    out = []
    for pos in positions:
        sampled = entry(pos.sampled.token_id, pos.sampled.logprob)
        top = [entry(t.token_id, t.logprob) for t in pos.top[:top_k]]
        out.append(TokenLogprobContent(**sampled.model_dump(), top_logprobs=top))
    return out


def _absorb(
    state: ServerState, req: ChatCompletionRequest, choice: _ChoiceState, delta: ChoiceDelta
) -> list[TokenLogprobContent]:
    """Fold a delta into the choice; returns the logprobs entries it added."""
    choice.text.append(delta.text)
    choice.num_tokens += len(delta.token_ids)
    choice.cached = max(choice.cached, delta.num_cached_tokens)
    new: list[TokenLogprobContent] = []
    if req.logprobs and delta.logprobs:
        new = _token_logprobs(state, delta.logprobs, req.top_logprobs or 0)
        choice.logprobs.extend(new)
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    return new


def _final_choice(
    index: int, choice: _ChoiceState, role: str, echo: str, req: ChatCompletionRequest
) -> ChatCompletionChoice:
    return ChatCompletionChoice(
        index=index,
        message=ChatResponseMessage(role=role, content=echo + "".join(choice.text)),
        logprobs=ChatLogProbs(content=choice.logprobs) if req.logprobs else None,
        finish_reason=choice.finish_reason,
        stop_reason=choice.stop_reason,
    )


def _usage(num_prompt_tokens: int, choices: list[_ChoiceState]) -> UsageInfo:
    return UsageInfo.build(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=sum(c.num_tokens for c in choices),
        cached_tokens=max((c.cached for c in choices), default=0),
    )


def _stream(
    state: ServerState,
    req: ChatCompletionRequest,
    request_id: str,
    role: str,
    num_prompt_tokens: int,
    choices: list[_ChoiceState],
    streams: list[AsyncGenerator[ChoiceDelta, None]],
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    exclude = None if req.include_usage else {"usage"}
    echo = _echo_text(req, role)

    def event(choice: ChatChunkChoice | None, usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=request_id,
            created=created,
            model=state.model_name,
            choices=[choice] if choice is not None else [],
            usage=usage,
        )
        return sse_event(chunk.model_dump(mode="json", exclude=exclude))

    async def events(deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        for i in range(len(choices)):
            yield event(ChatChunkChoice(index=i, delta=DeltaMessage(role=role, content="")))
            if echo:
                yield event(ChatChunkChoice(index=i, delta=DeltaMessage(content=echo)))
        async for delta in deltas:
            new = _absorb(state, req, choices[delta.index], delta)
            if not delta.text and not new and delta.finish_reason is None:
                continue
            yield event(
                ChatChunkChoice(
                    index=delta.index,
                    delta=DeltaMessage(content=delta.text or None),
                    logprobs=ChatLogProbs(content=new) if new else None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
            )
        if req.include_usage:
            yield event(None, usage=_usage(num_prompt_tokens, choices))

    return sse_stream(state, streams, events)

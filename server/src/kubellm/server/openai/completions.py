"""POST /v1/completions: validate, fan out prompts times n, and answer as JSON or SSE."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

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
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)
from kubellm.server.state import ServerState
from kubellm.server.tokenizer import Tokenizer

_THREAD_ENCODE_CHARS = 16 * 1024
"""Prompts longer than this are tokenized in a worker thread, off the event loop."""


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str | None
    """The prompt text, when it was given as text (decoded lazily for echo otherwise)."""


@dataclass
class _ChoiceState:
    prompt: _Prompt
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    cached: int = 0
    logprobs: CompletionLogProbs | None = None
    offset: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False


async def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > _THREAD_ENCODE_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
    return tokenizer.encode(text, add_special_tokens)


async def _prompts(state: ServerState, req: CompletionRequest) -> list[_Prompt]:
    batch = req.prompts()
    if not batch:
        raise OpenAIError("the prompt is empty", param="prompt")
    limit = state.settings.frontend.max_n
    if len(batch) * req.num_choices > limit:
        raise OpenAIError(
            f"a request may ask for at most {limit} choices in all (prompts times n), "
            f"got {len(batch)} x {req.num_choices}",
            param="prompt",
        )
    prompts = []
    for item in batch:
        if isinstance(item, str):
            if not item:
                raise OpenAIError("the prompt is empty", param="prompt")
            ids = await _encode(state.tokenizer, item, req.add_special_tokens)
            prompts.append(_Prompt(ids, item))
        else:
            prompts.append(_Prompt(list(item), None))
        validate.check_prompt(state, prompts[-1].token_ids, "prompt")
    return prompts


def _specs(
    state: ServerState, req: CompletionRequest, request_id: str, prompts: list[_Prompt]
) -> list[ChoiceSpec]:
    n = req.num_choices
    specs = []
    for p_index, prompt in enumerate(prompts):
        max_tokens = validate.resolve_max_tokens(state, len(prompt.token_ids), req.max_tokens)
        for i in range(n):
            index = p_index * n + i
            sampling = validate.build_sampling(
                state,
                req,
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                seed=validate.choice_seed(req.seed, index),
            )
            specs.append(
                ChoiceSpec(
                    index=index,
                    request_id=f"{request_id}-{index}",
                    prompt_token_ids=prompt.token_ids,
                    sampling=sampling,
                    stop=req.stop_strings,
                    skip_special_tokens=req.skip_special_tokens,
                    include_stop_str_in_output=req.include_stop_str_in_output,
                    n_param=n,
                )
            )
    return specs


async def create_completion(state: ServerState, req: CompletionRequest) -> Response:
    """Validate everything first (4xx before the engine sees anything), then generate."""
    arrival_time = time.time()
    validate.check_model(state, req.model)
    validate.check_n(state, req.num_choices)
    validate.check_logprobs(state, req.logprobs, "logprobs")
    validate.check_max_tokens_given(req.max_tokens)
    if req.echo and req.logprobs is not None:
        raise OpenAIError("echo together with logprobs is not supported", param="echo")
    prompts = await _prompts(state, req)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    specs = _specs(state, req, request_id, prompts)
    log_request(state, request_id, specs, prompts[0].text)
    choices = [_ChoiceState(prompts[s.index // req.num_choices]) for s in specs]
    streams = [run_choice(state, s, arrival_time) for s in specs]
    if req.stream:
        body = _stream(state, req, request_id, choices, streams)
        return EventStreamResponse(body)
    async with consume(state, streams) as deltas:
        async for delta in deltas:
            _absorb(state, req, choices[delta.index], delta)
    response = CompletionResponse(
        id=request_id,
        model=state.model_name,
        choices=[_final_choice(i, c) for i, c in enumerate(choices)],
        usage=_usage(prompts, choices),
    )
    return JSONResponse(response.model_dump(mode="json"))


def _absorb(
    state: ServerState, req: CompletionRequest, choice: _ChoiceState, delta: ChoiceDelta
) -> str:
    """Fold a delta into the choice's state; returns the text to show for it."""
    text = delta.text
    if req.echo and not choice.started:
        prompt = choice.prompt
        text = (prompt.text or state.tokenizer.decode(prompt.token_ids, False)) + text
    choice.started = True
    choice.text.append(text)
    choice.num_tokens += len(delta.token_ids)
    choice.cached = max(choice.cached, delta.num_cached_tokens)
    if req.logprobs is not None and delta.logprobs:
        choice.logprobs = choice.logprobs or CompletionLogProbs()
        new = _logprobs(state, delta.logprobs, choice.offset)
        choice.offset += sum(len(t) for t in new.tokens)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(choice.logprobs, name).extend(getattr(new, name))
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    return text


def _logprobs(
    state: ServerState, positions: list[PositionLogprobs], offset: int
) -> CompletionLogProbs:
    tok = state.tokenizer
    out = CompletionLogProbs()
    for pos in positions:
        token = tok.token_text(pos.sampled.token_id)
        top = {tok.token_text(t.token_id): t.logprob for t in pos.top}
        top.setdefault(token, pos.sampled.logprob)
        out.text_offset.append(offset)
        out.tokens.append(token)
        out.token_logprobs.append(pos.sampled.logprob)
        out.top_logprobs.append(top)
        offset += len(token)
    return out


def _final_choice(index: int, choice: _ChoiceState) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text="".join(choice.text),
        logprobs=choice.logprobs,
        finish_reason=choice.finish_reason,
        stop_reason=choice.stop_reason,
    )


def _usage(prompts: list[_Prompt], choices: list[_ChoiceState]) -> UsageInfo:
    cached: dict[int, int] = {}
    for c in choices:
        cached[id(c.prompt)] = max(cached.get(id(c.prompt), 0), c.cached)
    return UsageInfo.build(
        prompt_tokens=sum(len(p.token_ids) for p in prompts),
        completion_tokens=sum(c.num_tokens for c in choices),
        cached_tokens=sum(cached.values()),
    )


def _new_logprobs(choice: _ChoiceState, before: int) -> CompletionLogProbs | None:
    """The logprobs entries added to `choice` since it had `before` tokens."""
    lp = choice.logprobs
    if lp is None or len(lp.tokens) <= before:
        return None
    return CompletionLogProbs(
        tokens=lp.tokens[before:],
        token_logprobs=lp.token_logprobs[before:],
        top_logprobs=lp.top_logprobs[before:],
        text_offset=lp.text_offset[before:],
    )


def _stream(
    state: ServerState,
    req: CompletionRequest,
    request_id: str,
    choices: list[_ChoiceState],
    streams: list[AsyncGenerator[ChoiceDelta, None]],
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    exclude = None if req.include_usage else {"usage"}

    def event(choice: CompletionChoice | None, usage: UsageInfo | None = None) -> str:
        chunk = CompletionStreamResponse(
            id=request_id,
            created=created,
            model=state.model_name,
            choices=[choice] if choice is not None else [],
            usage=usage,
        )
        return sse_event(chunk.model_dump(mode="json", exclude=exclude))

    async def events(deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[str]:
        async for delta in deltas:
            choice = choices[delta.index]
            before = len(choice.logprobs.tokens) if choice.logprobs else 0
            text = _absorb(state, req, choice, delta)
            logprobs = _new_logprobs(choice, before)
            if not text and delta.finish_reason is None and logprobs is None:
                continue
            yield event(
                CompletionChoice(
                    index=delta.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
            )
        if req.include_usage:
            prompts = list({id(c.prompt): c.prompt for c in choices}.values())
            yield event(None, usage=_usage(prompts, choices))

    return sse_stream(state, streams, events)

"""Drive engine requests for one API request: fan out n choices, detokenize, merge.

Each choice is one engine request "{request_id}-{i}". `run_choice` turns its RequestOutputs into
`ChoiceDelta`s (text deltas with stop strings applied); `merge` consumes several choices
concurrently. Closing either generator closes the engine iterator, which makes the engine client
abort the request (a stop string matched, or the HTTP client went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kubellm.protocol.messages import PositionLogprobs, RequestOutput, SamplingParams
from kubellm.server.detokenizer import IncrementalDetokenizer
from kubellm.server.errors import EngineDeadError, EngineGenerateError
from kubellm.server.state import ServerState
from kubellm.server.stats import RequestStats

logger = logging.getLogger(__name__)


@dataclass
class ChoiceSpec:
    """One choice of a request, ready to send to the engine."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n_param: int = 1


@dataclass
class ChoiceDelta:
    """New output of one choice; the last one of a choice has a finish_reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def _visible_ids(out: RequestOutput, spec: ChoiceSpec, eos_ids: Sequence[int]) -> list[int]:
    """The ids to detokenize: a final EOS / stop token is not shown unless asked for."""
    ids = list(out.new_token_ids)
    if out.finish_reason != "stop" or not ids or spec.include_stop_str_in_output:
        return ids
    return ids[:-1] if ids[-1] == out.stop_token_id or ids[-1] in eos_ids else ids


async def run_choice(
    state: ServerState, spec: ChoiceSpec, arrival_time: float
) -> AsyncGenerator[ChoiceDelta, None]:
    """Generate one choice and yield its deltas until it finishes."""
    detok = IncrementalDetokenizer(
        state.tokenizer,
        skip_special_tokens=spec.skip_special_tokens,
        stop=spec.stop,
        include_stop_str_in_output=spec.include_stop_str_in_output,
        min_tokens=spec.sampling.min_tokens,
        prompt_token_ids=spec.prompt_token_ids,
    )
    stats = RequestStats(
        arrival_time=arrival_time,
        num_prompt_tokens=len(spec.prompt_token_ids),
        max_tokens_param=spec.sampling.max_tokens,
        n_param=spec.n_param,
    )
    eos_ids = state.facts.eos_token_ids
    cached = 0
    outputs = state.engine.generate(
        spec.request_id, spec.prompt_token_ids, spec.sampling, arrival_time, stats=stats
    )
    try:
        async for out in outputs:
            if out.finish_reason == "error":
                raise EngineGenerateError(out.error or "the engine failed this request")
            cached = max(cached, out.num_cached_tokens)
            delta = ChoiceDelta(
                index=spec.index,
                text=detok.push(_visible_ids(out, spec, eos_ids)),
                token_ids=list(out.new_token_ids),
                logprobs=list(out.new_logprobs or ()),
                num_cached_tokens=cached,
            )
            if detok.stopped:
                delta.finish_reason, delta.stop_reason = "stop", detok.stop_reason
                stats.finish_reason = "stop"  # recorded as such, though the engine sees an abort
            elif out.finish_reason is not None:
                delta.text += detok.flush()
                delta.finish_reason = out.finish_reason
                delta.stop_reason = out.stop_token_id if out.finish_reason == "stop" else None
            yield delta
            if delta.finish_reason is not None:
                return
        yield ChoiceDelta(spec.index, detok.flush(), [], [], "abort", None, cached)
    finally:
        await _aclose(outputs)


async def merge(
    streams: list[AsyncGenerator[ChoiceDelta, None]],
) -> AsyncGenerator[ChoiceDelta, None]:
    """Consume several choices concurrently, yielding their deltas as they come."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for delta in only:
                yield delta
        return
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[ChoiceDelta, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for delta in s:
                    queue.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """A server-sent events response whose body generator is always closed when the response
    ends, however it ends (finished, client gone, cancelled), so that its unfinished engine
    requests are aborted at once rather than whenever the generator is garbage-collected."""

    def __init__(self, body: AsyncGenerator[str, None]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()


def sse_event(data: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_error_event(exc: BaseException) -> dict[str, Any]:
    """The one in-band error event of a stream that failed after its 200 was sent."""
    if isinstance(exc, EngineDeadError):
        message = EngineDeadError.CLIENT_MESSAGE
    elif isinstance(exc, EngineGenerateError):
        message = "The engine failed to process this request."
    else:
        logger.error("error in a streaming response", exc_info=exc)
        message = "The server had an internal error while processing your request."
    return {
        "error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}
    }


def log_request(
    state: ServerState, request_id: str, specs: Sequence[ChoiceSpec], prompt_text: str | None
) -> None:
    """With --enable-log-requests: the prompt (cut to --max-log-len) and sampling settings."""
    frontend = state.settings.frontend
    if not frontend.enable_log_requests or not specs:
        return
    limit = frontend.max_log_len
    ids = specs[0].prompt_token_ids
    logger.info(
        "request %s: %d choice(s), prompt=%r, prompt_token_ids=%s, sampling=%s",
        request_id,
        len(specs),
        prompt_text if prompt_text is None or limit is None else prompt_text[:limit],
        ids if limit is None else ids[:limit],
        specs[0].sampling,
    )


@contextlib.asynccontextmanager
async def consume(
    state: ServerState, streams: list[AsyncGenerator[ChoiceDelta, None]]
) -> AsyncIterator[AsyncGenerator[ChoiceDelta, None]]:
    """The merged deltas of `streams`, closed on exit (which aborts unfinished engine requests
    even when the consumer itself is closed at a yield); counted in `state.server_load`."""
    state.server_load += 1
    deltas = merge(streams)
    try:
        yield deltas
    finally:
        try:
            await deltas.aclose()
        finally:
            state.server_load -= 1


async def sse_stream(
    state: ServerState,
    streams: list[AsyncGenerator[ChoiceDelta, None]],
    events: Callable[[AsyncIterator[ChoiceDelta]], AsyncIterator[str]],
) -> AsyncGenerator[str, None]:
    """The SSE body of a streaming response: the events `events` makes of the merged deltas;
    an error (engine death, a failed request) becomes one error event; [DONE] always ends it."""
    async with consume(state, streams) as deltas:
        try:
            async for event in events(deltas):
                yield event
        except Exception as e:
            yield sse_event(stream_error_event(e))
        yield DONE

"""Offline API: `LLM(model).generate(prompt_token_ids, sampling)`. Torch-free itself.

llm = LLM("/models/SmolLM2-135M-Instruct", max_model_len=2048)
results = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=16, temperature=0))
results[0].token_ids
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from kubellm.engine.llm_engine import LLMEngine
from kubellm.protocol.messages import (
    AddRequest,
    FinishReason,
    PositionLogprobs,
    SamplingParams,
)
from kubellm.protocol.settings import EngineSettings

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as progress(num_finished, num_total) whenever a request finishes."""


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    """Generated tokens (the prompt is not repeated)."""
    logprobs: list[PositionLogprobs] | None = None
    """One entry per generated token when SamplingParams.logprobs was set."""
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


class LLM:
    """Generates for a batch of token-id prompts with continuous batching."""

    def __init__(self, model: str | None = None, **engine_settings: Any) -> None:
        self.engine = LLMEngine.from_settings(EngineSettings(model=model, **engine_settings))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def generate(
        self,
        prompts: Seq[Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams],
        progress: ProgressCallback | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; results come back in prompt order.

        Raises `kubellm.engine.backend.InvalidRequest` (before anything runs) when a prompt is
        refused.
        """
        params = _per_prompt(prompts, sampling)
        now = time.time()
        requests = [
            AddRequest(
                request_id=f"llm-{next(self._ids)}",
                prompt_token_ids=tuple(prompt),
                sampling=sp,
                arrival_time=now,
            )
            for prompt, sp in zip(prompts, params, strict=True)
        ]
        results = {r.request_id: GenerationResult(logprobs=_empty(r.sampling)) for r in requests}
        try:
            for request in requests:
                self.engine.add_request(request)
            self._run(results, progress)
        except BaseException:
            self.engine.abort_requests(list(results))
            raise
        return [results[r.request_id] for r in requests]

    def _run(self, results: dict[str, GenerationResult], progress: ProgressCallback | None) -> None:
        done = 0
        while done < len(results):
            if not self.engine.has_work():
                raise RuntimeError("the engine has no work but requests are unfinished")
            for out in self.engine.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.token_ids.extend(out.new_token_ids)
                if res.logprobs is not None and out.new_logprobs:
                    res.logprobs.extend(out.new_logprobs)
                res.num_prompt_tokens = out.num_prompt_tokens
                res.num_cached_tokens = res.num_cached_tokens or out.num_cached_tokens
                if out.finish_reason is not None:
                    res.finish_reason = out.finish_reason
                    res.stop_token_id = out.stop_token_id
                    res.error = out.error
                    done += 1
                    if progress is not None:
                        progress(done, len(results))


def _per_prompt(
    prompts: Seq[Seq[int]], sampling: SamplingParams | Seq[SamplingParams]
) -> list[SamplingParams]:
    if isinstance(sampling, SamplingParams):
        return [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
    return list(sampling)


def _empty(sp: SamplingParams) -> list[PositionLogprobs] | None:
    return [] if sp.logprobs is not None else None

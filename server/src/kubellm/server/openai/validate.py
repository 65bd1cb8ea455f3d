"""Request checks that need server state (R18): done before anything reaches the engine.

Each failure raises `OpenAIError`, which `kubellm.server.handlers` turns into OpenAI error JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubellm.protocol.messages import SamplingParams
from kubellm.server.errors import OpenAIError
from kubellm.server.openai.protocol import SamplingFields
from kubellm.server.state import ServerState


def check_model(state: ServerState, model: str | None) -> None:
    """An unknown model name is a 404, as with OpenAI."""
    if model is not None and model not in state.served_model_names:
        raise OpenAIError(
            f"The model `{model}` does not exist.", status=404, type="NotFoundError", param="model"
        )


def check_n(state: ServerState, n: int) -> None:
    limit = state.settings.frontend.max_n
    if not 1 <= n <= limit:
        raise OpenAIError(f"n must be between 1 and {limit}, got {n}", param="n")


def check_logprobs(state: ServerState, value: int | None, param: str) -> None:
    limit = state.settings.frontend.max_logprobs
    if value is not None and not 0 <= value <= limit:
        raise OpenAIError(f"{param} must be between 0 and {limit}, got {value}", param=param)


def check_max_tokens_given(value: int | None, param: str = "max_tokens") -> None:
    """Cheap check before tokenizing: a given max_tokens must be >= 1."""
    if value is not None and value < 1:
        raise OpenAIError(f"{param} must be at least 1, got {value}", param=param)


def check_token_ids(state: ServerState, ids: Sequence[int], param: str) -> None:
    """Token ids must index the model's vocabulary."""
    vocab = state.facts.vocab_size
    for token in ids:
        if not 0 <= token < vocab:
            raise OpenAIError(
                f"token id {token} is out of vocabulary (valid: 0..{vocab - 1})", param=param
            )


def check_prompt(state: ServerState, prompt_ids: Sequence[int], param: str) -> None:
    if not prompt_ids:
        raise OpenAIError("the prompt is empty", param=param)
    check_token_ids(state, prompt_ids, param)


def resolve_max_tokens(
    state: ServerState, num_prompt_tokens: int, requested: int | None, where: str = "prompt"
) -> int:
    """The output budget: `requested`, or what fits in the context when it is None."""
    max_len = state.facts.max_model_len
    check_max_tokens_given(requested)
    if num_prompt_tokens >= max_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_len} tokens. However, your "
            f"{where} has {num_prompt_tokens} tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {where}.",
            param="messages" if where == "messages" else "prompt",
        )
    if requested is None:
        return max_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {where}, "
            f"{requested} in the completion). Please reduce the length of the {where} or "
            "completion.",
            param="max_tokens",
        )
    return requested


def build_sampling(
    state: ServerState,
    req: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    seed: int | None,
) -> SamplingParams:
    """Engine sampling settings for one choice (already validated field by field)."""
    if req.min_tokens > max_tokens:
        raise OpenAIError(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    stop_ids = tuple(req.stop_token_ids or ())
    check_token_ids(state, stop_ids, "stop_token_ids")
    top_k = req.top_k if req.top_k is not None else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(top_k, 0),
        min_p=req.min_p or 0.0,
        seed=seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=stop_ids,
        logprobs=logprobs,
    )


def choice_seed(seed: int | None, index: int) -> int | None:
    """Seeded requests give choice i the seed `seed + i` (wrapped into 64 bits)."""
    if seed is None:
        return None
    value = seed + index
    if value >= 2**63:
        value -= 2**64
    return value

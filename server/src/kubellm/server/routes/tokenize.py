"""POST /tokenize and POST /detokenize (vLLM's utility endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kubellm.server.openai.chat import encode_chat, render_chat
from kubellm.server.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from kubellm.server.openai.validate import check_model, check_token_ids
from kubellm.server.routes.openai import server_state

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize")
async def tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request
) -> TokenizeResponse:
    state = server_state(request)
    check_model(state, body.model)
    if isinstance(body, TokenizeChatRequest):
        text = render_chat(state, body)
    else:
        text = body.prompt
    tokens = await encode_chat(state.tokenizer, text, body.add_special_tokens)
    return TokenizeResponse(
        tokens=tokens, count=len(tokens), max_model_len=state.facts.max_model_len
    )


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = server_state(request)
    check_model(state, body.model)
    check_token_ids(state, body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

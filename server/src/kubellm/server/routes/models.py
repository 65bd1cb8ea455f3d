"""GET /v1/models and GET /v1/models/{model}: the served model names."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kubellm.server.openai.validate import check_model
from kubellm.server.routes.openai import server_state
from kubellm.server.state import ServerState

router = APIRouter(tags=["openai"])


def _card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(state.start_time),
        "owned_by": "kubellm",
        "root": state.facts.model,
        "parent": None,
        "max_model_len": state.facts.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    return {"object": "list", "data": [_card(state, name) for name in state.served_model_names]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    check_model(state, model)
    return _card(state, model)

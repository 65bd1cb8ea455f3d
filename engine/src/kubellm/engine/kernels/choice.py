"""Choosing the attention backend from `EngineSettings.attention_backend` at start-up."""

from __future__ import annotations

import importlib
import logging
from typing import Literal

import torch

logger = logging.getLogger(__name__)

AttentionBackend = Literal["torch", "triton"]


def triton_importable() -> bool:
    """Whether `import triton` succeeds here (it may be absent, or broken without a GPU)."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # any failure means: no Triton backend
        logger.debug("triton is not importable: %s", exc)
        return False
    return True


def resolve_attention_backend(setting: str, device: torch.device) -> AttentionBackend:
    """The backend to use: "auto" is triton on CUDA when triton imports, else torch; an explicit
    "triton" that cannot run is a ValueError naming the flag."""
    if setting == "torch":
        return "torch"
    if setting not in ("auto", "triton"):
        raise ValueError(
            f"unknown --attention-backend {setting!r}; expected 'auto', 'torch' or 'triton'"
        )
    if setting == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if device.type != "cuda":
        raise ValueError(
            f"--attention-backend triton needs a CUDA device, but the engine runs on "
            f"{device.type!r}; use --attention-backend auto or torch"
        )
    if not triton_importable():
        raise ValueError(
            "--attention-backend triton was requested but triton cannot be imported; "
            "install triton or use --attention-backend auto or torch"
        )
    return "triton"

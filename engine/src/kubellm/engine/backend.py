"""What the EngineCore process drives: a real `LLMEngine` or the torch-free `DummyEngine`.

Torch-free, so that the dummy backend and the EngineCore loop run without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

from kubellm.protocol.messages import AddRequest, RequestOutput, SchedulerStats


class InvalidRequest(ValueError):
    """The engine refuses one request (e.g. prompt longer than max_model_len); it stays healthy."""


class EngineBackend(Protocol):
    model: str
    max_model_len: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    supported_tasks: tuple[str, ...]

    def add_request(self, request: AddRequest) -> None:
        """Queue a request; raises InvalidRequest when it cannot ever be served."""

    def abort_requests(self, request_ids: Seq[str]) -> list[RequestOutput]:
        """Drop these requests and free their blocks; returns finish_reason="abort" outputs
        for the ones that were known."""

    def has_work(self) -> bool:
        """Whether step() would do anything."""

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return the delta outputs of this step."""

    def stats(self) -> SchedulerStats: ...

    def reset_prefix_cache(self) -> bool: ...

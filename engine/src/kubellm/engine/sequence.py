"""Sequences and the per-step batch description shared by the scheduler and the model runner.

Torch-free. KV layout contract: `block_ids[i]` holds the KV of token positions
[i * block_size, (i + 1) * block_size); the flat slot of position p is
`block_ids[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kubellm.protocol.messages import FinishReason, PositionLogprobs, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    """Prompt followed by the tokens generated so far."""
    num_prompt_tokens: int
    sampling: SamplingParams
    arrival_time: float = 0.0
    client_index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    """Leading tokens whose K/V are already in the cache (from earlier steps or prefix hits)."""
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the sequence was first scheduled."""
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_sent_tokens: int = 0
    """Generated tokens already reported to the client (for delta outputs)."""
    num_sent_logprobs: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    """One entry per generated token when sampling.logprobs is not None."""
    error: str | None = None
    """With finish_reason="error": why the engine failed this sequence."""
    seq_no: int = 0
    """Admission order, assigned by the scheduler; breaks arrival_time ties."""
    num_pending_tokens: int = 0
    """Tokens sampled by steps still running on the device: logically they follow token_ids,
    but their ids are not known yet (async scheduling; 0 otherwise)."""
    block_hashes: list[int] = field(default_factory=list)
    """Chained prefix-cache hashes of the leading full blocks of token_ids (computed lazily by
    the block manager; valid as long as token_ids only grow)."""

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt_token_ids: list[int] | tuple[int, ...],
        sampling: SamplingParams,
        arrival_time: float = 0.0,
        client_index: int = 0,
    ) -> Sequence:
        return cls(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            sampling=sampling,
            arrival_time=arrival_time,
            client_index=client_index,
        )

    @property
    def num_tokens(self) -> int:
        """Known tokens (prompt and generated); pending ones are not counted."""
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, the pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute tokens [num_computed_tokens, +num_new_tokens)."""

    seq: Sequence
    num_new_tokens: int
    sample: bool
    """True when this chunk reaches the sequence's last known token: sample the next one."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    computed_before: list[int] = field(default_factory=list)
    """Each entry's num_computed_tokens before the step, set by `Scheduler.on_launched`."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprobs: PositionLogprobs | None = None

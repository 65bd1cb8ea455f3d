"""`LLMEngine`: scheduler + block manager + an executor (the model runner). Torch-free itself.

`step()` = schedule → `executor.execute(batch)` → update (append sampled tokens, stop checks,
free finished sequences) → delta `RequestOutput`s. The executor is anything with
`execute(SchedulerOutput) -> list[SampleResult]` returning one result per scheduled entry with
`sample=True`, in order; `from_settings()` builds the real torch `ModelRunner` lazily, so that
this module imports no torch.

Async scheduling (`EngineSettings.async_scheduling`, with an executor that has `launch`): once
step N is launched, `step()` schedules and launches step N+1 before it waits for N's tokens
(`Scheduler.schedule_ahead`); N+1 takes its input tokens from N's samples on the device. The
host's bookkeeping for N (stop checks, outputs, sending them) then overlaps the device's work
on N+1. Each `step()` call still returns the outputs of exactly one step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Protocol

from kubellm.engine.backend import InvalidRequest
from kubellm.engine.block_manager import BlockManager
from kubellm.engine.scheduler import Scheduler
from kubellm.engine.sequence import SampleResult, SchedulerOutput, Sequence
from kubellm.protocol.messages import (
    AddRequest,
    FinishReason,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
)
from kubellm.protocol.settings import EngineSettings

logger = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, batch: SchedulerOutput) -> list[SampleResult]: ...


class StepHandle(Protocol):
    """A launched step; `wait()` blocks until its samples are on the host."""

    def wait(self) -> list[SampleResult]: ...


class AsyncExecutor(Executor, Protocol):
    def launch(self, batch: SchedulerOutput) -> StepHandle:
        """Start a step without waiting for it. An entry whose input token is pending (one
        past the sequence's known tokens) takes the token the previous launch sampled."""
        ...


class _Done:
    """A step that already ran (executors without `launch`)."""

    def __init__(self, results: list[SampleResult]) -> None:
        self.results = results

    def wait(self) -> list[SampleResult]:
        return self.results


class LLMEngine:
    """Implements `kubellm.engine.backend.EngineBackend`."""

    supported_tasks: tuple[str, ...] = ("generate",)

    def __init__(
        self,
        executor: Executor,
        *,
        model: str,
        vocab_size: int,
        eos_token_ids: Seq[int],
        max_model_len: int,
        num_kv_blocks: int,
        block_size: int,
        settings: EngineSettings | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        settings = settings or EngineSettings()
        self.executor = executor
        self.model = model
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        self.max_num_seqs = settings.max_num_seqs
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.settings = settings
        self.block_manager = BlockManager(
            num_kv_blocks, block_size, enable_prefix_caching=settings.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=max_model_len,
            block_manager=self.block_manager,
            eos_token_ids=self.eos_token_ids,
        )
        self._requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.async_scheduling = settings.async_scheduling and hasattr(executor, "launch")
        self._ahead: tuple[SchedulerOutput, StepHandle] | None = None
        """The step launched ahead by the previous `step()` call, still running."""
        self.num_ahead_steps = 0
        """Steps that were launched ahead (async scheduling)."""

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LLMEngine:
        """Resolve the model, load it into a `ModelRunner` and size the KV cache."""
        from kubellm.engine.config import ModelConfig
        from kubellm.engine.model_files import resolve_model
        from kubellm.engine.model_runner import ModelRunner

        path = resolve_model(settings.model)
        config = ModelConfig.from_dir(path)
        max_model_len = settings.max_model_len or config.max_position_embeddings
        if max_model_len > config.max_position_embeddings:
            raise ValueError(
                f"--max-model-len {max_model_len} is larger than the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        runner = ModelRunner(config, settings)
        capacity = runner.num_kv_blocks * runner.block_size
        if capacity < max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({runner.num_kv_blocks} blocks of "
                f"{runner.block_size}), fewer than one sequence of max_model_len={max_model_len}; "
                "lower --max-model-len or give the KV cache more memory "
                "(--kv-cache-memory-gib, --num-kv-blocks or --gpu-memory-utilization)"
            )
        logger.info(
            "engine ready: model %s, max_model_len %d, %d KV blocks of %d tokens, %s %s",
            path,
            max_model_len,
            runner.num_kv_blocks,
            runner.block_size,
            runner.device,
            runner.dtype,
        )
        return cls(
            runner,
            model=str(path),
            vocab_size=config.vocab_size,
            eos_token_ids=config.eos_token_ids,
            max_model_len=max_model_len,
            num_kv_blocks=runner.num_kv_blocks,
            block_size=runner.block_size,
            settings=settings,
            device=runner.device,
            dtype=runner.dtype,
        )

    # ---- requests -------------------------------------------------------------------------

    def _validate(self, request: AddRequest) -> None:
        rid = request.request_id
        prompt = request.prompt_token_ids
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens, but this model's maximum context "
                f"length is {self.max_model_len} tokens (prompt and output)"
            )
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad} is out of the vocabulary (0..{self.vocab_size - 1})"
            )
        _validate_sampling(request.sampling)

    def add_request(self, request: AddRequest) -> None:
        self._validate(request)
        seq = Sequence.new(
            request.request_id,
            request.prompt_token_ids,
            request.sampling,
            arrival_time=request.arrival_time,
            client_index=request.client_index,
        )
        self._requests[request.request_id] = seq
        self.scheduler.add(seq)

    def abort_requests(self, request_ids: Seq[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            seq = self._requests.pop(rid, None)
            if seq is None:
                continue
            self.scheduler.finish(seq, "abort")
            outputs.append(self._output(seq))
        return outputs

    def has_work(self) -> bool:
        return self._ahead is not None or self.scheduler.has_work()

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        reported: list[Sequence] = []
        batch: SchedulerOutput | None = None
        if self._ahead is not None:
            batch, handle = self._ahead
            self._ahead = None
        else:
            scheduled = self.scheduler.schedule()
            reported = self.scheduler.take_failed()
            if not scheduled.is_empty:
                batch, handle = scheduled, self._launch(scheduled)
        if batch is not None:
            if self.async_scheduling:
                ahead = self.scheduler.schedule_ahead()
                if ahead is not None:
                    self._ahead = (ahead, self._launch(ahead))
                    self.num_ahead_steps += 1
            reported += self.scheduler.on_results(batch, handle.wait())
            self.num_steps += 1
        outputs = []
        for seq in reported:
            outputs.append(self._output(seq))
            if seq.is_finished:
                self._requests.pop(seq.request_id, None)
        return outputs

    def _launch(self, batch: SchedulerOutput) -> StepHandle:
        """Hand `batch` to the executor and mark it launched in the scheduler."""
        launch = getattr(self.executor, "launch", None)
        handle = launch(batch) if launch is not None else _Done(self.executor.execute(batch))
        self.scheduler.on_launched(batch)
        return handle

    def _output(self, seq: Sequence) -> RequestOutput:
        """The delta since seq's previous output, marking it sent."""
        new_tokens = tuple(seq.token_ids[seq.num_prompt_tokens + seq.num_sent_tokens :])
        seq.num_sent_tokens += len(new_tokens)
        logprobs = None
        if seq.sampling.logprobs is not None:
            logprobs = tuple(seq.logprobs[seq.num_sent_logprobs :])
            seq.num_sent_logprobs = len(seq.logprobs)
        finish: FinishReason | None = seq.finish_reason if seq.is_finished else None
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_logprobs=logprobs,
            finish_reason=finish,
            stop_token_id=seq.stop_token_id,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            error=seq.error,
        )

    # ---- utilities ------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_steps=self.num_steps,
        )

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()


def _validate_sampling(sp: SamplingParams) -> None:
    if sp.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {sp.max_tokens}")
    if not 0 <= sp.min_tokens <= sp.max_tokens:
        raise InvalidRequest(
            f"min_tokens must be between 0 and max_tokens ({sp.max_tokens}), got {sp.min_tokens}"
        )
    if sp.logprobs is not None and sp.logprobs < 0:
        raise InvalidRequest(f"logprobs must be >= 0, got {sp.logprobs}")

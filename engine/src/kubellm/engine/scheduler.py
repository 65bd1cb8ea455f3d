"""Continuous-batching scheduler: token budget, chunked prefill, recompute preemption. Torch-free.

Each step gives every scheduled sequence a number of new tokens to compute, starting at its
`num_computed_tokens`: 1 for a decoding sequence, a chunk of the prompt for a prefilling one.
Prefill and decode mix freely in one step. Running sequences are served first (oldest first),
then waiting ones are admitted first come, first served.

When a block cannot be allocated, the most recently arrived running sequence is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue (its prefix
blocks usually stay cached, so the recompute is cheap).
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Iterable

from kubellm.engine.block_manager import BlockManager
from kubellm.engine.sequence import (
    SampleResult,
    ScheduledSeq,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)
from kubellm.protocol.messages import FinishReason

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_manager: BlockManager,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens, max_model_len must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Kept sorted by (arrival_time, seq_no): the last one is the preemption victim."""
        self.num_preemptions = 0
        self._next_seq_no = 0
        self._failed: list[Sequence] = []

    # ---- queue management -----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.seq_no = self._next_seq_no
        self._next_seq_no += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._failed)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End seq now (abort, error), wherever it is, and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._set_finished(seq, reason, error)

    def _set_finished(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        self.block_manager.free(seq)

    def take_failed(self) -> list[Sequence]:
        """Sequences the scheduler failed on its own (too big for the KV cache)."""
        failed, self._failed = self._failed, []
        return failed

    # ---- scheduling -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted_ids=preempted,
        )

    def _too_big(self, seq: Sequence, num_tokens: int) -> bool:
        """Fail seq when holding `num_tokens` needs more blocks than the whole cache has."""
        bm = self.block_manager
        if bm.blocks_for(num_tokens) <= bm.num_blocks:
            return False
        msg = (
            f"sequence needs {bm.blocks_for(num_tokens)} KV blocks for {num_tokens} tokens, "
            f"but the KV cache has only {bm.num_blocks} blocks of {bm.block_size} tokens"
        )
        logger.warning("request %s failed: %s", seq.request_id, msg)
        self._set_finished(seq, "error", msg)
        self._failed.append(seq)
        return True

    def _schedule_running(
        self, budget: int, scheduled: list[ScheduledSeq], preempted: list[str]
    ) -> int:
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            if self._too_big(seq, target):
                self.running.pop(i)
                continue
            while not bm.allocate_slots(seq, target):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new, sample=target == seq.num_tokens))
                budget -= num_new
                i += 1
                continue
            break  # seq preempted itself: everything after it is gone too
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (%d tokens)", seq.request_id, seq.num_tokens)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._too_big(seq, seq.num_tokens):
                self.waiting.popleft()
                continue
            hits = bm.find_cached_blocks(seq)
            num_computed = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not bm.can_allocate(hits, num_computed + num_new):
                break
            self.waiting.popleft()
            num_cached = bm.take_cached_blocks(seq, hits)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            if not bm.allocate_slots(seq, num_computed + num_new):
                raise RuntimeError("block allocation failed after can_allocate")
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival_key)
            scheduled.append(
                ScheduledSeq(seq, num_new, sample=num_computed + num_new == seq.num_tokens)
            )
            budget -= num_new
        return budget

    # ---- async scheduling -----------------------------------------------------------------

    def schedule_ahead(self) -> SchedulerOutput | None:
        """The next decode step, scheduled while the previous step still runs on the device.

        Called after `on_launched` of that step and before its `on_results`: every running
        sequence then has its newest token pending (sampled on the device, id unknown). Returns
        None, and the caller runs the next step synchronously, unless every running sequence is
        decoding with exactly one pending token, none needs its output history (penalties), no
        request waits for admission, and each gets its KV slot without preemption. A sequence
        whose pending token ends it by length is left out; one that stops on EOS or a stop token
        wastes its share of this step, whose result is then ignored.
        """
        if self.waiting or self._failed or len(self.running) > self.max_num_batched_tokens:
            return None
        bm = self.block_manager
        scheduled: list[ScheduledSeq] = []
        for seq in self.running:
            if seq.num_pending_tokens != 1 or seq.num_computed_tokens != seq.num_tokens:
                return None
            if _needs_history(seq):
                return None
            if self._ends_by_length(seq, seq.num_tokens + 1):
                continue
            target = seq.num_tokens + 1
            if bm.blocks_for(target) > bm.num_blocks or not bm.allocate_slots(seq, target):
                return None
            scheduled.append(ScheduledSeq(seq, 1, sample=True))
        if not scheduled:
            return None
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=len(scheduled))

    def _ends_by_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens (pending ones included) finishes seq by length."""
        return seq.num_output_tokens >= seq.sampling.max_tokens or num_tokens >= self.max_model_len

    # ---- after the model ran --------------------------------------------------------------

    def update(self, output: SchedulerOutput, results: list[SampleResult]) -> list[Sequence]:
        """Apply one executed step (`on_launched` then `on_results`)."""
        self.on_launched(output)
        return self.on_results(output, results)

    def on_launched(self, output: SchedulerOutput) -> None:
        """A step was handed to the device: its tokens count as computed, and each sampling
        entry's next token is pending until `on_results`."""
        before = output.computed_before
        before.clear()
        for entry in output.scheduled:
            seq = entry.seq
            before.append(seq.num_computed_tokens)
            seq.num_computed_tokens += entry.num_new_tokens
            if entry.sample:
                seq.num_pending_tokens += 1

    def on_results(self, output: SchedulerOutput, results: list[SampleResult]) -> list[Sequence]:
        """Apply a launched step's sampled tokens; returns the sequences that got one, in order.

        Sequences that finished while the step ran (aborted, or stopped by the step before)
        are skipped: their share of the step is discarded.
        """
        num_samples = sum(1 for entry in output.scheduled if entry.sample)
        if len(results) != num_samples:
            raise RuntimeError(
                f"executor returned {len(results)} results for {num_samples} sampled sequences"
            )
        if len(output.computed_before) != len(output.scheduled):
            raise RuntimeError("on_results of a step that was not marked launched")
        sampled: list[Sequence] = []
        it = iter(results)
        for entry, before in zip(output.scheduled, output.computed_before, strict=True):
            seq = entry.seq
            result = next(it) if entry.sample else None
            if seq.is_finished:
                continue
            if result is not None:
                seq.num_pending_tokens -= 1
                seq.token_ids.append(result.token_id)
            self.block_manager.register_full_blocks(seq, before)
            if result is None:
                continue
            if seq.sampling.logprobs is not None and result.logprobs is not None:
                seq.logprobs.append(result.logprobs)
            sampled.append(seq)
            reason = self.check_stop(seq)
            if reason is not None:
                self.running.remove(seq)
                self._set_finished(seq, reason)
        return sampled

    def check_stop(self, seq: Sequence) -> FinishReason | None:
        """The finish reason after seq's newest known token, or None to go on. Sets
        stop_token_id. (Tokens of a step launched ahead are still pending and do not count.)"""
        sp = seq.sampling
        num_out = seq.num_tokens - seq.num_prompt_tokens
        if num_out >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        if num_out < sp.min_tokens:
            return None
        last = seq.token_ids[-1]
        if not sp.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if last in sp.stop_token_ids:
            seq.stop_token_id = last
            return "stop"
        return None


def _needs_history(seq: Sequence) -> bool:
    """Whether sampling seq reads its output tokens (penalties), so no token may be pending."""
    sp = seq.sampling
    return sp.repetition_penalty != 1.0 or bool(sp.presence_penalty or sp.frequency_penalty)


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_no)

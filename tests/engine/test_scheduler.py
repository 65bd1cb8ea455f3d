"""Scheduler: token budget, chunked prefill, mixed batches, preemption, failures, stop checks."""

from __future__ import annotations

from typing import Any

import pytest

from kubellm.engine.block_manager import BlockManager
from kubellm.engine.scheduler import Scheduler
from kubellm.engine.sequence import SampleResult, SchedulerOutput, Sequence, SequenceStatus
from kubellm.protocol.messages import SamplingParams

BS = 4
EOS = 2


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    budget: int = 16,
    max_model_len: int = 256,
) -> Scheduler:
    bm = BlockManager(num_blocks, BS)
    return Scheduler(max_num_seqs, budget, max_model_len, bm, eos_token_ids=(EOS,))


def make_seq(rid: str, n: int, arrival: float = 0.0, **sampling: Any) -> Sequence:
    sp = SamplingParams(**{"max_tokens": 100, **sampling})
    return Sequence.new(rid, [10 + i for i in range(n)], sp, arrival_time=arrival)


def run_step(sched: Scheduler, token: int = 5) -> SchedulerOutput:
    """Schedule once and feed `token` to every sampled entry."""
    out = sched.schedule()
    check_batch(sched, out)
    sched.update(out, [SampleResult(token) for e in out.scheduled if e.sample])
    return out


def check_batch(sched: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    for e in out.scheduled:
        end = e.seq.num_computed_tokens + e.num_new_tokens
        assert e.num_new_tokens > 0
        assert end <= e.seq.num_tokens
        assert e.sample == (end == e.seq.num_tokens)
        assert len(e.seq.block_ids) * BS >= end


def test_chunked_prefill_splits_long_prompt_within_budget() -> None:
    sched = make_scheduler(budget=16)
    seq = make_seq("a", 40)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        out = run_step(sched)
        chunks.append([(e.num_new_tokens, e.sample) for e in out.scheduled])
    assert chunks == [[(16, False)], [(16, False)], [(8, True)]]
    assert seq.num_computed_tokens == 40
    assert run_step(sched).scheduled[0].num_new_tokens == 1  # then decode


def test_prefill_and_decode_mix_in_one_step() -> None:
    sched = make_scheduler(budget=16)
    a = make_seq("a", 6)
    sched.add(a)
    run_step(sched)
    b = make_seq("b", 30)
    sched.add(b)
    out = run_step(sched)
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 15)]
    assert out.num_batched_tokens == 16


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(3):
        sched.add(make_seq(f"s{i}", 4))
    out = run_step(sched)
    assert [e.seq.request_id for e in out.scheduled] == ["s0", "s1"]
    assert [s.request_id for s in sched.waiting] == ["s2"]


def test_fcfs_head_of_line_waits_for_blocks() -> None:
    sched = make_scheduler(num_blocks=4, budget=64)
    sched.add(make_seq("a", 12))  # 3 blocks
    sched.add(make_seq("b", 8))  # 2 blocks: does not fit next to a
    sched.add(make_seq("c", 2))  # would fit, but must not overtake b
    out = run_step(sched)
    assert [e.seq.request_id for e in out.scheduled] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_preemption_picks_latest_arrival_and_requeues_at_front() -> None:
    sched = make_scheduler(num_blocks=4, budget=64)
    old = make_seq("old", 8, arrival=1.0)  # 2 blocks, full
    new = make_seq("new", 8, arrival=2.0)
    sched.add(old)
    sched.add(new)
    sched.add(make_seq("later", 3, arrival=3.0))
    run_step(sched)  # both prefilled, 4 blocks used; both sampled a token (need a 3rd block)
    assert sched.block_manager.num_free_blocks == 0
    out = sched.schedule()
    check_batch(sched, out)
    assert out.preempted_ids == ["new"]
    assert [e.seq.request_id for e in out.scheduled] == ["old"]
    assert [s.request_id for s in sched.waiting] == ["new", "later"]
    assert new.status is SequenceStatus.WAITING
    assert new.num_computed_tokens == 0
    assert new.block_ids == []
    assert new.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert new.num_output_tokens == 1  # its output is kept and recomputed later


def test_a_sequence_can_preempt_itself() -> None:
    sched = make_scheduler(num_blocks=4, budget=64)
    a = make_seq("a", 8, arrival=1.0)
    b = make_seq("b", 8, arrival=2.0)
    sched.add(b)  # b is admitted first but arrived later
    sched.add(a)
    run_step(sched)
    out = sched.schedule()
    # running is ordered by arrival: a is served, then b, the newest, gives way
    assert out.preempted_ids == ["b"]
    assert [e.seq.request_id for e in out.scheduled] == ["a"]


def test_too_big_sequence_fails_alone() -> None:
    sched = make_scheduler(num_blocks=4, budget=64)
    big = make_seq("big", 17)  # 5 blocks > 4
    small = make_seq("small", 5)
    sched.add(big)
    sched.add(small)
    out = run_step(sched)
    assert [e.seq.request_id for e in out.scheduled] == ["small"]
    failed = sched.take_failed()
    assert failed == [big]
    assert big.finish_reason == "error"
    assert big.error is not None and "KV cache" in big.error
    assert sched.take_failed() == []
    assert sched.block_manager.num_free_blocks == 2


def test_running_sequence_outgrowing_the_cache_fails_alone() -> None:
    sched = make_scheduler(num_blocks=2, budget=64)
    seq = make_seq("a", 7, max_tokens=10)
    sched.add(seq)
    for _ in range(2):
        run_step(sched)
    assert seq.num_tokens == 9  # needs a 3rd block for the next step
    out = run_step(sched)
    assert out.is_empty
    assert sched.take_failed() == [seq]
    assert seq.finish_reason == "error"
    assert not sched.has_work()
    assert sched.block_manager.num_free_blocks == 2


def test_finish_frees_blocks_wherever_the_sequence_is() -> None:
    sched = make_scheduler()
    a, b = make_seq("a", 6), make_seq("b", 6)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert a.finish_reason == b.finish_reason == "abort"
    assert not sched.has_work()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_update_refuses_a_wrong_number_of_results() -> None:
    sched = make_scheduler()
    sched.add(make_seq("a", 3))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="results"):
        sched.update(out, [])


@pytest.mark.parametrize(
    ("sampling", "tokens", "reason", "stop_id", "num_out"),
    [
        pytest.param({}, [5, EOS, 5], "stop", None, 2, id="eos"),
        pytest.param(
            {"ignore_eos": True, "max_tokens": 3}, [5, EOS, 5], "length", None, 3, id="ignore_eos"
        ),
        pytest.param({"min_tokens": 3}, [EOS, EOS, EOS, EOS], "stop", None, 3, id="min_tokens-eos"),
        pytest.param({"stop_token_ids": (7,)}, [5, 7, 5], "stop", 7, 2, id="stop_token_ids"),
        pytest.param(
            {"stop_token_ids": (7,), "min_tokens": 2},
            [7, 7, 5],
            "stop",
            7,
            2,
            id="min_tokens-stop-id",
        ),
        pytest.param(
            {"stop_token_ids": (EOS,), "ignore_eos": True},
            [5, EOS],
            "stop",
            EOS,
            2,
            id="stop-id-beats-ignore_eos",
        ),
        pytest.param({"max_tokens": 2}, [5, 5, 5], "length", None, 2, id="max_tokens"),
        pytest.param({"max_tokens": 2}, [5, EOS], "length", None, 2, id="max_tokens-first"),
    ],
)
def test_stop_conditions(
    sampling: dict[str, Any], tokens: list[int], reason: str, stop_id: int | None, num_out: int
) -> None:
    sched = make_scheduler()
    seq = make_seq("a", 3, **sampling)
    sched.add(seq)
    for token in tokens:
        run_step(sched, token)
        if seq.is_finished:
            break
    assert seq.finish_reason == reason
    assert seq.stop_token_id == stop_id
    assert seq.num_output_tokens == num_out
    assert seq.output_token_ids == tokens[:num_out]
    assert seq.block_ids == []
    assert not sched.has_work()


def test_max_model_len_gives_length() -> None:
    sched = make_scheduler(max_model_len=10)
    seq = make_seq("a", 7, max_tokens=100)
    sched.add(seq)
    while not seq.is_finished:
        run_step(sched)
    assert seq.finish_reason == "length"
    assert seq.num_tokens == 10


def test_preempted_sequence_reuses_its_own_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=5, budget=64)
    old = make_seq("old", 8, arrival=1.0, max_tokens=2)
    new = make_seq("new", 9, arrival=2.0)  # 3 blocks, 2 of them full after prefill
    sched.add(old)
    sched.add(new)
    run_step(sched)
    run_step(sched)  # old needs its 3rd block: new is preempted
    assert new.num_preemptions == 1
    assert new.num_cached_tokens == 0
    assert old.finish_reason == "length"
    num_tokens = new.num_tokens
    out = run_step(sched)
    (entry,) = (e for e in out.scheduled if e.seq is new)
    # re-admitted: the 2 full blocks it computed before the preemption are prefix hits
    assert entry.num_new_tokens == num_tokens - 8
    assert new.num_cached_tokens == 0  # still what the first admission found

"""Async scheduling: step N+1 is scheduled and launched before step N's tokens are known.

`AsyncFakeExecutor` behaves like a device stream: `launch` snapshots what a real launch would
read (input tokens, with the pending one taken from the previous launch's samples, and the
block table), and the work itself runs later, in launch order, when a handle is waited on. Its
samples depend only on the context it reads back from its simulated KV cache, so a run with
async scheduling must give exactly the outputs of a run without, and any KV slot that a
finished or aborted sequence's stray work overwrote while another sequence used it shows up as
a mismatch.
"""

from __future__ import annotations

import importlib.util
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_llm_engine as tle  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.llm import LLM
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.sequence import SampleResult, SchedulerOutput, Sequence
from kubellm.protocol.messages import RequestOutput, SamplingParams
from kubellm.protocol.settings import EngineSettings


@dataclass
class _Entry:
    seq: Sequence
    start: int
    inputs: list[int | None]
    """Input token per new position; None: the previous launch's sample for this sequence."""
    block_ids: list[int]
    sample: bool
    num_out: int


class _Handle:
    def __init__(self, device: AsyncFakeExecutor) -> None:
        self.device = device
        self.results: list[SampleResult] | None = None

    def wait(self) -> list[SampleResult]:
        while self.results is None:
            self.device.run_next()
        return self.results


class AsyncFakeExecutor(tle.FakeExecutor):  # type: ignore[misc]
    def __init__(self, num_blocks: int, block_size: int, script: dict[str, list[int]]) -> None:
        super().__init__(num_blocks, block_size, script)
        self.queue: deque[tuple[list[_Entry], _Handle]] = deque()
        self.last: dict[Sequence, int] = {}
        """Samples of the latest step that ran, by sequence."""
        self.launched_rows: set[Sequence] = set()
        """Sequences sampled by the latest launch (a pending input must come from it)."""
        self.pending_inputs = 0

    def launch(self, batch: SchedulerOutput) -> _Handle:
        entries = []
        for e in batch.scheduled:
            seq, start = e.seq, e.seq.num_computed_tokens
            known = len(seq.token_ids)
            inputs: list[int | None] = list(seq.token_ids[start : start + e.num_new_tokens])
            if start + e.num_new_tokens > known:
                assert seq in self.launched_rows, "a pending input not sampled by the last launch"
                assert start + e.num_new_tokens == known + 1
                inputs.append(None)
                self.pending_inputs += 1
            entries.append(
                _Entry(seq, start, inputs, list(seq.block_ids), e.sample, seq.num_output_tokens)
            )
        self.launched_rows = {e.seq for e in batch.scheduled if e.sample}
        handle = _Handle(self)
        self.queue.append((entries, handle))
        return handle

    def run_next(self) -> None:
        entries, handle = self.queue.popleft()
        tokens: dict[Sequence, list[int]] = {}
        for e in entries:
            ids = [self.last[e.seq] if t is None else t for t in e.inputs]
            for i, t in enumerate(ids):
                self.kv[self._slot(e.block_ids, e.start + i)] = (t, e.start + i)
            tokens[e.seq] = ids
        results, samples = [], {}
        for e in entries:
            if not e.sample:
                continue
            end = e.start + len(e.inputs)
            context = [self.kv[self._slot(e.block_ids, p)] for p in range(end)]
            known = e.seq.token_ids[: e.start] + tokens[e.seq]
            if [c[0] if c else None for c in context] != known:
                raise tle.KVMismatch(f"{e.seq.request_id}: KV cache does not hold its context")
            result = self._sample(e.seq.request_id, known, e.num_out, e.seq.sampling)
            results.append(result)
            samples[e.seq] = result.token_id
        self.last = samples
        handle.results = results


def make_engine(
    async_scheduling: bool,
    num_blocks: int = 64,
    script: dict[str, list[int]] | None = None,
    **settings: object,
) -> LLMEngine:
    settings.setdefault("max_num_batched_tokens", 32)
    settings.setdefault("max_num_seqs", 8)
    executor = (
        AsyncFakeExecutor(num_blocks, tle.BS, script or {})
        if async_scheduling
        else tle.FakeExecutor(num_blocks, tle.BS, script)
    )
    return LLMEngine(
        executor,
        model="fake",
        vocab_size=tle.VOCAB,
        eos_token_ids=(tle.EOS,),
        max_model_len=128,
        num_kv_blocks=num_blocks,
        block_size=tle.BS,
        settings=EngineSettings(block_size=tle.BS, async_scheduling=async_scheduling, **settings),
    )


def _summary(outputs: dict[str, list[RequestOutput]]) -> dict[str, tuple[list[int], str | None]]:
    return {rid: (tle.tokens_of(outs), outs[-1].finish_reason) for rid, outs in outputs.items()}


def _run_both(
    requests: list[tuple[str, list[int], dict[str, object]]],
    script: dict[str, list[int]] | None = None,
    **settings: object,
) -> tuple[dict[str, tuple[list[int], str | None]], LLMEngine]:
    results = []
    engines = []
    for async_on in (False, True):
        engine = make_engine(async_on, script=script, **settings)
        for rid, prompt, sampling in requests:
            engine.add_request(tle.request(rid, prompt, **sampling))
        results.append(_summary(tle.run_all(engine)))
        engines.append(engine)
    assert results[1] == results[0]
    return results[1], engines[1]


def test_async_runs_ahead_and_matches_sync() -> None:
    prompts = tle.prompts(6, seed=3, shared=6)
    reqs = [(f"r{i}", p, {"max_tokens": 5 + 3 * i}) for i, p in enumerate(prompts)]
    out, engine = _run_both(reqs)
    assert all(len(toks) == 5 + 3 * i for i, (toks, _) in enumerate(out.values()))
    assert engine.num_ahead_steps > 0
    assert engine.executor.pending_inputs > 0
    assert not engine.executor.queue and not engine.has_work()


def test_stop_token_while_a_step_runs_ahead_adds_no_token() -> None:
    # r0 emits EOS as its 4th token: the step launched ahead for it is wasted and ignored.
    script = {"r0": [7, 8, 9, tle.EOS, 5, 5], "r1": [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]}
    reqs = [("r0", [1, 2, 3], {"max_tokens": 20}), ("r1", [5, 6], {"max_tokens": 10})]
    out, engine = _run_both(reqs, script=script)
    assert out["r0"] == ([7, 8, 9, tle.EOS], "stop")
    assert out["r1"] == ([4] * 10, "length")
    assert engine.num_ahead_steps > 0


def test_preemption_and_admission_fall_back_to_sync_steps() -> None:
    # A tiny cache forces preemptions; late arrivals force admission steps.
    prompts = tle.prompts(8, seed=5)
    reqs = [(f"r{i}", p, {"max_tokens": 12}) for i, p in enumerate(prompts)]
    out, engine = _run_both(reqs, num_blocks=24)
    assert all(len(toks) == 12 for toks, _ in out.values())
    assert engine.scheduler.num_preemptions > 0
    assert engine.num_ahead_steps > 0


def test_penalties_keep_steps_synchronous() -> None:
    reqs = [("p", [1, 2, 3], {"max_tokens": 6, "repetition_penalty": 1.3})]
    _, engine = _run_both(reqs)
    assert engine.num_ahead_steps == 0


def test_abort_while_a_step_runs_ahead() -> None:
    engine = make_engine(True)
    for rid, p in (("a", [1, 2, 3]), ("b", [4, 5])):
        engine.add_request(tle.request(rid, p, max_tokens=30))
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None  # a step for both is in flight
    aborted = engine.abort_requests(["a"])
    assert aborted[0].finish_reason == "abort"
    later = tle.run_all(engine)
    assert "a" not in later
    assert later["b"][-1].finish_reason == "length"
    total_b = sum(o.num_prompt_tokens for o in later["b"][-1:])  # prompt count is reported
    assert total_b == 2
    assert not engine.has_work() and engine.block_manager.usage == 0


def test_runner_async_equals_sync_on_a_tiny_model(tiny_dirs: dict[str, Path]) -> None:
    """The real ModelRunner (CPU): pending input tokens are gathered from the previous
    launch's samples on the device; greedy, seeded sampling, logprobs and min_tokens match."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8, 7]]
    params = [
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=11),
        SamplingParams(max_tokens=6, temperature=0.0, min_tokens=6),
    ]
    results = []
    for async_on in (False, True):
        llm = LLM(
            str(tiny_dirs["qwen3"]),
            device="cpu",
            num_kv_blocks=32,
            max_model_len=128,
            async_scheduling=async_on,
        )
        out = llm.generate(prompts, params)
        results.append([(r.token_ids, r.finish_reason, r.logprobs) for r in out])
        if async_on:
            assert llm.engine.num_ahead_steps > 0
        else:
            assert llm.engine.num_ahead_steps == 0
    assert results[1] == results[0]


@pytest.mark.parametrize("async_on", [False, True])
def test_engine_without_launch_never_runs_ahead(async_on: bool) -> None:
    engine = tle.make_engine(async_scheduling=async_on)
    engine.add_request(tle.request("x", [1, 2, 3], max_tokens=5))
    tle.run_all(engine)
    assert engine.num_ahead_steps == 0


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (conftest turns it on where there is no CUDA)",
)
def test_whole_triton_path_in_the_interpreter(tiny_dirs: dict[str, Path]) -> None:
    """Fused norm/RoPE/SiLU kernels, the varlen prefill kernel, the decode kernel through the
    graph path's static buffers (replayed eagerly), and steps launched ahead: the greedy tokens
    of the plain torch path."""
    import test_cuda_graphs as tcg  # type: ignore[import-not-found, unused-ignore]
    import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
    import torch

    from kubellm.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
    from kubellm.engine.kernels import triton_fused

    prompts = [tc.random_prompt(n, seed=i) for i, n in enumerate([3, 17, 40, 21])]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 3, 5, 4)]
    llm = LLM(str(tiny_dirs["qwen3"]), device="cpu", num_kv_blocks=64, max_model_len=256)
    expected = [r.token_ids for r in llm.generate(prompts, params)]
    runner = tcg._runner(llm)
    for attn in runner.model.attention_layers():
        attn.set_backend("triton")
    runner.attention_backend = "triton"
    runner.model.use_kernels(triton_fused)
    graphs = DecodeGraphs(
        runner.model, graph_batch_sizes(4), 16, runner.block_size, torch.device("cpu")
    )
    with torch.inference_mode():
        for bucket in graphs.sizes:
            graphs.outputs[bucket] = graphs._forward(bucket)
            graphs.graphs[bucket] = tcg._EagerReplay(graphs, bucket)
    runner.decode_graphs = graphs
    ahead_before = llm.engine.num_ahead_steps
    got = [r.token_ids for r in llm.generate(prompts, params)]
    assert got == expected
    assert graphs.replays > 0 and llm.engine.num_ahead_steps > ahead_before


def test_pending_tokens_prefix_copy_equals_the_gather() -> None:
    import torch

    from kubellm.engine.cuda_graphs import PendingTokens

    sampled = torch.tensor([41, 42, 43, 44])
    by_prefix, by_gather = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    PendingTokens(None, None, sampled, 3).apply(by_prefix)
    PendingTokens(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), sampled).apply(by_gather)
    assert by_prefix.tolist() == by_gather.tolist() == [41, 42, 43, 0, 0, 0]
    shuffled = torch.zeros(6, dtype=torch.long)
    PendingTokens(torch.tensor([4, 0]), torch.tensor([1, 3]), sampled).apply(shuffled)
    assert shuffled.tolist() == [44, 0, 0, 0, 42, 0]

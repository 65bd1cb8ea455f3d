"""ModelRunner driven by hand-built SchedulerOutputs: greedy ids equal transformers' generate.

The test plays the scheduler: it hands out KV blocks, decides each step's chunks, and after a
step advances `num_computed_tokens` and appends the sampled tokens (the runner never does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch

from kubellm.engine.config import ModelConfig
from kubellm.engine.model_runner import ModelRunner
from kubellm.engine.sequence import ScheduledSeq, SchedulerOutput, Sequence
from kubellm.protocol.messages import SamplingParams
from kubellm.protocol.settings import EngineSettings

BS = 4
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)


def _reference(path: Path, prompt: list[int], n: int) -> list[int]:
    hf = tc.load_hf(path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return list(out[0, len(prompt) :].tolist())


class Driver:
    """A minimal stand-in for the scheduler and block manager."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0
        self.steps = 0

    def new_seq(self, rid: str, prompt: list[int]) -> Sequence:
        return Sequence.new(rid, prompt, GREEDY)

    def _alloc(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_ids) * BS < num_tokens:
            if self.next_block >= self.runner.num_kv_blocks:
                raise RuntimeError("test ran out of KV blocks")
            seq.block_ids.append(self.next_block)
            self.next_block += 1

    def step(self, plan: list[tuple[Sequence, int]]) -> None:
        scheduled = []
        for seq, n in plan:
            self._alloc(seq, seq.num_computed_tokens + n)
            scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
        before = [(list(s.token_ids), s.num_computed_tokens) for s, _ in plan]
        results = self.runner.execute(SchedulerOutput(scheduled, sum(n for _, n in plan)))
        after = [(list(s.token_ids), s.num_computed_tokens) for s, _ in plan]
        assert before == after, "the runner must not mutate sequences"
        assert len(results) == sum(e.sample for e in scheduled)
        it = iter(results)
        for e in scheduled:
            e.seq.num_computed_tokens += e.num_new_tokens
            if e.sample:
                e.seq.token_ids.append(next(it).token_id)
        self.steps += 1

    def decode(self, seqs: list[Sequence], steps: int) -> None:
        for _ in range(steps):
            self.step([(s, 1) for s in seqs])


def _runner(path: Path, num_blocks: int = 96) -> ModelRunner:
    settings = EngineSettings(model=str(path), num_kv_blocks=num_blocks, block_size=BS)
    return ModelRunner(ModelConfig.from_dir(path), settings)


@pytest.mark.slow
@pytest.mark.parametrize("kind", tc.KINDS)
def test_mixed_batch_greedy_equals_generate(tiny_dirs: dict[str, Path], kind: str) -> None:
    path = tiny_dirs[kind]
    drv = Driver(_runner(path))
    prompts = [tc.random_prompt(n, seed) for seed, n in enumerate((5, 13, 1, 30))]
    seqs = [drv.new_seq(f"r{i}", p) for i, p in enumerate(prompts)]
    new_tokens = 10
    drv.step([(s, s.num_tokens) for s in seqs])  # one prefill step for all four
    drv.decode(seqs, new_tokens - 1)
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.output_token_ids == _reference(path, prompt, new_tokens)


@pytest.mark.slow
def test_chunked_prefill_alongside_decodes(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen3"]
    drv = Driver(_runner(path))
    short = drv.new_seq("short", tc.random_prompt(6, 10))
    long_prompt = tc.random_prompt(23, 11)
    long = drv.new_seq("long", long_prompt)
    drv.step([(short, 6), (long, 5)])  # long: chunk 1 (no sample)
    assert short.num_output_tokens == 1 and long.num_output_tokens == 0
    drv.step([(short, 1), (long, 7)])  # chunk 2 on top of cached context, mixed with a decode
    drv.step([(long, 11), (short, 1)])  # last chunk samples; the decode comes after it
    assert long.num_output_tokens == 1
    drv.decode([short, long], 6)
    assert long.output_token_ids == _reference(path, long_prompt, 7)
    assert short.output_token_ids == _reference(path, short.prompt_token_ids, 9)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [1, 6])
def test_prefix_hit_reuses_blocks(tiny_dirs: dict[str, Path], suffix: int) -> None:
    path = tiny_dirs["llama_tied_llama3"]
    drv = Driver(_runner(path))
    first_prompt = tc.random_prompt(14, 20)
    first = drv.new_seq("a", first_prompt)
    drv.step([(first, first.num_tokens)])
    drv.decode([first], 3)
    shared_blocks = 3  # 12 tokens in full blocks
    second_prompt = first_prompt[: shared_blocks * BS] + tc.random_prompt(suffix, 21)
    second = drv.new_seq("b", second_prompt)
    second.block_ids = first.block_ids[:shared_blocks]
    second.num_computed_tokens = shared_blocks * BS
    drv.step([(first, 1), (second, suffix)])
    drv.decode([first, second], 5)
    assert second.output_token_ids == _reference(path, second_prompt, 6)
    assert first.output_token_ids == _reference(path, first_prompt, 10)
    assert second.block_ids[:shared_blocks] == first.block_ids[:shared_blocks]


@pytest.mark.slow
def test_runner_attributes_and_empty_step(tiny_dirs: dict[str, Path]) -> None:
    runner = _runner(tiny_dirs["qwen2"], num_blocks=8)
    assert runner.num_kv_blocks == 8 and runner.block_size == BS
    assert runner.device == "cpu" and runner.dtype == "float32"
    assert runner.eos_token_ids == (tc.EOS,)
    assert runner.execute(SchedulerOutput([], 0)) == []


@pytest.mark.slow
def test_kv_blocks_from_memory_budget(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen2"]
    cfg = ModelConfig.from_dir(path)
    settings = EngineSettings(model=str(path), block_size=BS, kv_cache_memory_gib=0.001)
    runner = ModelRunner(cfg, settings)
    per_block = 2 * cfg.num_hidden_layers * BS * cfg.num_key_value_heads * cfg.head_dim * 4
    assert runner.num_kv_blocks == int(0.001 * (1 << 30)) // per_block
    attn = runner.model.attention_layers()[0]
    assert attn.k_cache.shape == (runner.num_kv_blocks, BS, cfg.num_key_value_heads, cfg.head_dim)

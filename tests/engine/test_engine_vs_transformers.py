"""End to end: LLM / LLMEngine with the real ModelRunner, greedy output equal to transformers.

Covers mixed prompt lengths in one batch with chunked prefill, prefix-cache hits, and
preemption (recompute) forced by a KV cache too small for all sequences at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch

from kubellm.engine.llm import LLM
from kubellm.protocol.messages import SamplingParams

BS = 4
DEVICE = os.environ.get("KUBELLM_TEST_DEVICE", "cpu")
"""Where our engine runs (the transformers reference stays on CPU, float32). CI has no GPU;
`KUBELLM_TEST_DEVICE=cuda` runs these same checks on one (see bench/RESULTS.md)."""


def _reference(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers greedy generate, one prompt at a time, stopping at EOS like the engine."""
    hf = tc.load_hf(path)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n, pad_token_id=0)
            out.append(ids[0, len(p) :].tolist())
    return out


def _llm(path: Path, num_kv_blocks: int, **kw: object) -> LLM:
    return LLM(
        model=str(path),
        num_kv_blocks=num_kv_blocks,
        block_size=BS,
        max_model_len=64,
        max_num_batched_tokens=32,
        device=DEVICE,
        dtype="float32",
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama_tied_llama3", "qwen3"])
def test_mixed_batch_and_prefix_hits(tiny_dirs: dict[str, Path], kind: str) -> None:
    path = tiny_dirs[kind]
    llm = _llm(path, num_kv_blocks=128)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [tc.random_prompt(n, seed) for seed, n in enumerate((3, 41, 9, 17, 26))]
    results = llm.generate(prompts, greedy)
    assert [r.token_ids for r in results] == _reference(path, prompts, 12)
    # Second round: prompts sharing the first ones' full blocks hit the prefix cache.
    shared = [prompts[1][:32] + tc.random_prompt(5, 10), prompts[3][:16] + tc.random_prompt(1, 11)]
    again = llm.generate(shared, greedy)
    assert all(r.num_cached_tokens >= 16 for r in again)
    assert [r.token_ids for r in again] == _reference(path, shared, 12)


@pytest.mark.slow
def test_preemption_keeps_greedy_output(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen2"]
    llm = _llm(path, num_kv_blocks=18, max_num_seqs=8)  # 72 tokens for ~5 x 40 needed
    prompts = [tc.random_prompt(n, 30 + seed) for seed, n in enumerate((12, 20, 7, 15, 10))]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    results = llm.generate(prompts, greedy)
    assert llm.engine.stats().num_preemptions > 0
    assert [r.token_ids for r in results] == _reference(path, prompts, 24)


@pytest.mark.slow
def test_seeded_sampling_survives_preemption(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["llama_untied"]
    prompts = [tc.random_prompt(n, 40 + seed) for seed, n in enumerate((14, 9, 18, 11))]
    params = [
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=100 + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    roomy = _llm(path, num_kv_blocks=128).generate(prompts, params)
    tight_llm = _llm(path, num_kv_blocks=16, max_num_seqs=8)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.stats().num_preemptions > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
    alone = _llm(path, num_kv_blocks=64).generate([prompts[2]], params[2])
    assert alone[0].token_ids == roomy[2].token_ids


@pytest.mark.slow
def test_logprobs_match_transformers(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen3"]
    prompt = tc.random_prompt(11, 50)
    sp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    result = _llm(path, num_kv_blocks=64).generate([prompt], sp)[0]
    hf = tc.load_hf(path)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert result.token_ids == out.sequences[0, len(prompt) :].tolist()
    assert result.logprobs is not None and len(result.logprobs) == 6
    for pos, step_logits in zip(result.logprobs, out.logits, strict=True):
        ref = torch.log_softmax(step_logits[0].float(), -1)
        vals, ids = ref.topk(3)
        assert [t.token_id for t in pos.top] == ids.tolist()
        assert [t.logprob for t in pos.top] == pytest.approx(vals.tolist(), abs=1e-4)
        assert pos.sampled.logprob == pytest.approx(ref[pos.sampled.token_id].item(), abs=1e-4)

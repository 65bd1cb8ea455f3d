"""Sampler: greedy, seeds, top-k/top-p/min-p, penalties, min_tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from kubellm.engine.sampler import Sampler, step_seed
from kubellm.engine.sequence import Sequence
from kubellm.protocol.messages import SamplingParams

V = 50
EOS = 3
CPU = torch.device("cpu")


def _seq(
    sp: SamplingParams, prompt: list[int] | None = None, output: tuple[int, ...] | list[int] = ()
) -> Sequence:
    seq = Sequence.new("r", prompt if prompt is not None else [5, 6, 7], sp)
    seq.token_ids.extend(output)
    return seq


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(CPU, seed, (EOS,))


def _probs_of(sampler: Sampler, logits: torch.Tensor, seq: Sequence, draws: int) -> torch.Tensor:
    """Empirical distribution of the sampled token over `draws` independent rows."""
    tokens = [r.token_id for r in sampler(logits.expand(draws, V).clone(), [seq] * draws)]
    return torch.bincount(torch.tensor(tokens), minlength=V).float() / draws


def test_greedy_is_argmax() -> None:
    logits = _logits(4)
    seqs = [_seq(SamplingParams(max_tokens=5, temperature=0.0)) for _ in range(4)]
    out = _sampler()(logits, seqs)
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()
    assert all(r.logprobs is None for r in out)


def test_greedy_on_bfloat16_logits_takes_the_float32_argmax() -> None:
    """Plain greedy rows skip the float32 copy; ties resolve to the same (first) index, and a
    row that still needs its EOS masked (min_tokens) goes through the full path."""
    logits = _logits(3, seed=7).bfloat16()
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie
    logits[2, EOS] = logits[2].max() + 1
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    seqs = [_seq(greedy), _seq(greedy), _seq(greedy)]
    fast = [r.token_id for r in _sampler()(logits, seqs)]
    assert fast == logits.float().argmax(-1).tolist()
    assert fast[1] == 10 and fast[2] == EOS
    seqs[2] = _seq(SamplingParams(max_tokens=5, temperature=0.0, min_tokens=2))
    masked = [r.token_id for r in _sampler()(logits, seqs)]
    assert masked[:2] == fast[:2] and masked[2] != EOS


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(6, seed=3)
    seqs = [_seq(SamplingParams(max_tokens=5, temperature=1.5, top_k=1)) for _ in range(6)]
    assert [r.token_id for r in _sampler()(logits, seqs)] == logits.argmax(-1).tolist()


def test_seeded_requests_ignore_batch_composition() -> None:
    base = _logits(1, seed=5)
    sp = SamplingParams(max_tokens=50, temperature=1.0, top_p=0.9, seed=1234)
    seeded = _seq(sp, output=[1, 2])
    alone = _sampler(seed=0)(base.clone(), [seeded])[0].token_id
    others = [_seq(SamplingParams(max_tokens=5, temperature=0.8)) for _ in range(5)]
    batch = torch.cat([_logits(3, seed=9), base, _logits(2, seed=10)])
    mixed = _sampler(seed=77)(batch, [*others[:3], seeded, *others[3:]])
    assert mixed[3].token_id == alone
    # Recompute after a preemption samples the same token at the same output length.
    again = _sampler(seed=99)(base.clone(), [_seq(sp, output=[1, 2])])[0].token_id
    assert again == alone
    # The draw differs from step to step and from seed to seed (not a constant).
    draws = {
        _sampler()(base.clone(), [_seq(replace_seed(sp, s), output=[1] * n)])[0].token_id
        for s in range(4)
        for n in range(6)
    }
    assert len(draws) > 1


def replace_seed(sp: SamplingParams, seed: int) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(sp, seed=seed)


def test_step_seed_mixes() -> None:
    seeds = {step_seed(s, n) for s in range(10) for n in range(10)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(-1, 0) >= 0


def test_unseeded_requests_use_the_engine_generator() -> None:
    logits = _logits(8, seed=2)
    seqs = [_seq(SamplingParams(max_tokens=5, temperature=1.0)) for _ in range(8)]
    a = [r.token_id for r in _sampler(seed=1)(logits, seqs)]
    b = [r.token_id for r in _sampler(seed=1)(logits, seqs)]
    assert a == b


def test_sampling_follows_the_distribution_and_filters() -> None:
    logits = torch.zeros(1, V)
    logits[0, :4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    s = _sampler()
    free = _probs_of(s, logits, _seq(SamplingParams(max_tokens=5)), 4000)
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(free, expected, atol=0.03)
    top2 = _probs_of(s, logits, _seq(SamplingParams(max_tokens=5, top_k=2)), 2000)
    assert set(top2.nonzero().flatten().tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)
    top_p = float(p[0] + p[1] / 2)  # needs the two best tokens, never a third
    nucleus = _probs_of(s, logits, _seq(SamplingParams(max_tokens=5, top_p=top_p)), 2000)
    assert set(nucleus.nonzero().flatten().tolist()) == {0, 1}
    min_p = _probs_of(s, logits, _seq(SamplingParams(max_tokens=5, min_p=0.3)), 2000)
    assert set(min_p.nonzero().flatten().tolist()) == {0, 1}
    cold = _probs_of(s, logits, _seq(SamplingParams(max_tokens=5, temperature=0.3)), 2000)
    assert cold[0] > free[0] + 0.2


def test_repetition_penalty_like_hf() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0] + [0.0] * (V - 4)])
    sp = SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=2.0)
    # token 3 is the argmax; seen in the prompt it is halved to 1.5 < 2.0 (token 0).
    assert _sampler()(logits.clone(), [_seq(sp, prompt=[3])])[0].token_id == 0
    # token 0 seen in the output: 2.0 -> 1.0; token 1 (negative) is multiplied: -1 -> -2.
    seq = _seq(sp, prompt=[3, 1], output=[0])
    penalised = _sampler()._apply_penalties(logits.clone(), [seq], [sp])
    assert penalised[0, :4].tolist() == [1.0, -2.0, 0.5, 1.5]


def test_presence_and_frequency_penalties_use_output_only() -> None:
    logits = torch.zeros(1, V)
    sp = SamplingParams(max_tokens=5, presence_penalty=0.5, frequency_penalty=0.25)
    seq = _seq(sp, prompt=[7, 7, 7], output=[4, 4, 9])
    out = _sampler()._apply_penalties(logits, [seq], [sp])
    assert out[0, 4].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 9].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 7].item() == 0.0  # prompt tokens are not penalised by these two
    assert logits.abs().sum().item() == 0.0, "raw logits must stay untouched"
    plain = _seq(SamplingParams(max_tokens=5), output=[4])
    assert _sampler()._apply_penalties(logits, [plain], [plain.sampling]) is logits


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 11] = 9.0
    logits[0, 12] = 8.0
    sp = SamplingParams(max_tokens=9, temperature=0.0, min_tokens=2, stop_token_ids=(11,))
    s = _sampler()
    assert s(logits.clone(), [_seq(sp, output=[20])])[0].token_id == 12
    assert s(logits.clone(), [_seq(sp, output=[20, 21])])[0].token_id == EOS
    ignore = SamplingParams(max_tokens=9, temperature=0.0, min_tokens=2, ignore_eos=True)
    assert s(logits.clone(), [_seq(ignore)])[0].token_id == EOS


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(3, seed=4)
    sps = [
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(max_tokens=5, temperature=0.7, logprobs=0),
        SamplingParams(max_tokens=5, temperature=0.0),
    ]
    seqs = [_seq(sp, prompt=[int(logits[0].argmax())]) for sp in sps]
    out = _sampler()(logits.clone(), seqs)
    ref = torch.log_softmax(logits, -1)
    first = out[0].logprobs
    assert first is not None and len(first.top) == 3
    top_vals, top_ids = ref[0].topk(3)
    assert [t.token_id for t in first.top] == top_ids.tolist()
    assert [t.logprob for t in first.top] == pytest.approx(top_vals.tolist(), abs=1e-6)
    assert first.sampled.token_id == out[0].token_id
    assert first.sampled.logprob == pytest.approx(ref[0, out[0].token_id].item(), abs=1e-6)
    # The penalty moved the greedy choice away from the raw argmax; logprobs stay raw.
    assert out[0].token_id != top_ids[0].item()
    second = out[1].logprobs
    assert second is not None and second.top == ()
    assert second.sampled.logprob == pytest.approx(ref[1, out[1].token_id].item(), abs=1e-6)
    assert out[2].logprobs is None

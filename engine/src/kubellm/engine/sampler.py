"""Turn a step's logits into next tokens, one per sampled sequence.

Order of operations (vLLM's, and Hugging Face's for the overlapping parts): penalties
(repetition over prompt + output, presence/frequency over output) → min_tokens masking of EOS
and stop tokens → greedy rows take the argmax; the others are divided by their temperature,
filtered by top-k, top-p and min-p, and sampled by the exponential race (argmax of
probs / Exp(1) noise), which needs no `torch.multinomial`.

A request with a seed draws its noise from a generator seeded with (seed, number of tokens
generated so far), so its samples do not depend on the rest of the batch and are the same after
a preemption and recompute. Requests without a seed share the engine's generator.

Logprobs are taken from log_softmax of the raw model logits (before penalties and temperature),
as vLLM does by default.

`sample()` only queues device work: the tokens (and logprobs) are copied to pinned host memory
asynchronously, and `SampledBatch.results()` waits for them. `__call__` does both at once.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from kubellm.engine.sequence import SampleResult, Sequence
from kubellm.engine.transfer import device_tensor, to_host
from kubellm.protocol.messages import PositionLogprobs, SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for one (request seed, generated-token count) pair."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: Seq[int]) -> None:
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        """logits [S, V] (any float dtype; used as float32), one row per sequence -> results."""
        return self.sample(logits, seqs).results()

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SampledBatch:
        """Queue the sampling of one token per row; nothing waits for the device."""
        params = [s.sampling for s in seqs]
        if all(_plain_greedy(p, s.num_output_tokens) for p, s in zip(params, seqs, strict=True)):
            # argmax of the model-dtype logits is the argmax of their float32 copies (the
            # conversion is exact), so the [S, V] conversion is skipped.
            tokens = logits.argmax(dim=-1)
            return SampledBatch(tokens, to_host(tokens), None)
        logits = logits.float()
        raw = logits
        logits = self._apply_penalties(logits, seqs, params)
        logits = self._apply_min_tokens(logits, seqs, params, logits is raw)
        tokens = logits.argmax(dim=-1)
        rand_rows = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k != 1]
        if rand_rows:
            idx = device_tensor(rand_rows, torch.long, logits.device)
            rand_params = [params[i] for i in rand_rows]
            noise = self._noise([seqs[i] for i in rand_rows], logits.shape[1])
            tokens[idx] = _sample(logits[idx], rand_params, noise)
        return SampledBatch(tokens, to_host(tokens), _logprob_tensors(raw, tokens, params))

    def _apply_penalties(
        self, logits: torch.Tensor, seqs: Seq[Sequence], params: list[SamplingParams]
    ) -> torch.Tensor:
        rows = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        ]
        if not rows:
            return logits
        vocab = logits.shape[1]
        dev = logits.device
        idx = device_tensor(rows, torch.long, dev)
        out_counts = _count_rows([seqs[i].output_token_ids for i in rows], vocab, dev)
        seen = _count_rows([seqs[i].prompt_token_ids for i in rows], vocab, dev) > 0
        seen |= out_counts > 0
        rep = _col([params[i].repetition_penalty for i in rows], dev)
        freq = _col([params[i].frequency_penalty for i in rows], dev)
        pres = _col([params[i].presence_penalty for i in rows], dev)
        sub = logits[idx]
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
        sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
        logits = logits.clone()
        logits[idx] = sub
        return logits

    def _apply_min_tokens(
        self,
        logits: torch.Tensor,
        seqs: Seq[Sequence],
        params: list[SamplingParams],
        must_copy: bool,
    ) -> torch.Tensor:
        for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            if seq.num_output_tokens >= p.min_tokens:
                continue
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            banned = [t for t in banned if 0 <= t < logits.shape[1]]
            if not banned:
                continue
            if must_copy:
                logits = logits.clone()
                must_copy = False
            logits[i, banned] = float("-inf")
        return logits

    def _noise(self, seqs: list[Sequence], vocab: int) -> torch.Tensor:
        """Exp(1) noise [R, V]: per-request generators for seeded rows, ours for the rest."""
        noise = torch.empty(len(seqs), vocab, device=self.device)
        unseeded = [i for i, s in enumerate(seqs) if s.sampling.seed is None]
        if unseeded:
            if len(unseeded) == len(seqs):
                return noise.exponential_(generator=self.generator)
            part = torch.empty(len(unseeded), vocab, device=self.device)
            part.exponential_(generator=self.generator)
            noise[device_tensor(unseeded, torch.long, self.device)] = part
        for i, s in enumerate(seqs):
            seed = s.sampling.seed
            if seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(step_seed(seed, s.num_output_tokens))
                noise[i].exponential_(generator=gen)
        return noise


def _plain_greedy(p: SamplingParams, num_output_tokens: int) -> bool:
    """Greedy with nothing that reads the logits beyond their argmax."""
    return (
        (p.temperature == 0 or p.top_k == 1)
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and num_output_tokens >= p.min_tokens
    )


def _col(values: list[float], device: torch.device) -> torch.Tensor:
    return device_tensor(values, torch.float32, device)[:, None]


def _count_rows(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Per-row token counts [R, V] (float32), padding with an extra dropped column."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    if width:
        ids = torch.tensor(
            [r + [vocab] * (width - len(r)) for r in rows], dtype=torch.long, device=device
        ).clamp_(0, vocab)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], noise: torch.Tensor
) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then the exponential race; rows are independent."""
    dev = logits.device
    vocab = logits.shape[1]
    x = logits / _col([p.temperature for p in params], dev)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab for k in ks) or any(tp < 1.0 for tp in top_ps):
        x = _top_k_top_p(x, ks, top_ps)
    if any(p.min_p > 0 for p in params):
        probs = x.softmax(dim=-1)
        threshold = _col([p.min_p for p in params], dev) * probs.amax(dim=-1, keepdim=True)
        x = x.masked_fill(probs < threshold, float("-inf"))
    return (x.softmax(dim=-1) / noise).argmax(dim=-1)


def _top_k_top_p(x: torch.Tensor, ks: list[int], top_ps: list[float]) -> torch.Tensor:
    dev = x.device
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[1], device=dev)[None, :]
    k_t = device_tensor(ks, torch.long, dev)[:, None]
    sorted_x = sorted_x.masked_fill(ranks >= k_t, float("-inf"))
    p_t = _col(top_ps, dev)
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    sorted_x = sorted_x.masked_fill((before >= p_t) & (p_t < 1.0), float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)


@dataclass
class _LogprobTensors:
    """The logprob rows of a step, copied (or being copied) to the host."""

    rows: list[int]
    ks: list[int]
    tokens: torch.Tensor
    sampled: torch.Tensor
    top_vals: torch.Tensor | None
    top_ids: torch.Tensor | None

    def to_results(self) -> dict[int, PositionLogprobs]:
        token_list: list[int] = self.tokens.tolist()
        sampled: list[float] = self.sampled.tolist()
        top_vals: list[list[float]] = [[] for _ in self.rows]
        top_ids: list[list[int]] = [[] for _ in self.rows]
        if self.top_vals is not None and self.top_ids is not None:
            top_vals, top_ids = self.top_vals.tolist(), self.top_ids.tolist()
        out: dict[int, PositionLogprobs] = {}
        for j, i in enumerate(self.rows):
            k = self.ks[j]
            top = tuple(
                TokenLogprob(t, v) for t, v in zip(top_ids[j][:k], top_vals[j][:k], strict=True)
            )
            out[i] = PositionLogprobs(sampled=TokenLogprob(token_list[j], sampled[j]), top=top)
        return out


def _logprob_tensors(
    raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
) -> _LogprobTensors | None:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    idx = device_tensor(rows, torch.long, raw.device)
    lp = torch.log_softmax(raw[idx], dim=-1)
    row_tokens = tokens[idx]
    sampled = lp.gather(1, row_tokens[:, None])[:, 0]
    ks = [min(params[i].logprobs or 0, raw.shape[1]) for i in rows]
    kmax = max(ks)
    vals = ids = None
    if kmax > 0:
        vals, ids = lp.topk(kmax, dim=-1)
        vals, ids = to_host(vals), to_host(ids)
    return _LogprobTensors(rows, ks, to_host(row_tokens), to_host(sampled), vals, ids)


class SampledBatch:
    """One step's sampled tokens: on the device now, on the host after `results()`."""

    def __init__(
        self, tokens: torch.Tensor, host_tokens: torch.Tensor, logprobs: _LogprobTensors | None
    ) -> None:
        self.tokens = tokens
        """Device tensor [S] (long): what the next step launched ahead reads its inputs from."""
        self._host = host_tokens
        self._logprobs = logprobs
        self._ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> list[SampleResult]:
        if self._ready is not None:
            self._ready.synchronize()
        token_ids: list[int] = self._host.tolist()
        lps = self._logprobs.to_results() if self._logprobs is not None else {}
        return [SampleResult(t, lps.get(i)) for i, t in enumerate(token_ids)]

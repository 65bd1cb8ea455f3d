"""Times the Triton varlen paged prefill kernel against the torch path, per layer, on CUDA.

The workload is one prefill step of issue 5's benchmark at Qwen3-0.6B's attention shape (16 query
heads, 8 KV heads, head_dim 128, bf16, KV blocks of 16 tokens): prompts drawn with
`random.Random(seed).randint(100, 1024)` fill a budget of 16,384 new tokens (the last prompt is
cut, as chunked prefill does). Cases:
- `fresh`: no cached context (29 prompts with seed 0);
- `prefix`: each prompt has its first half (rounded down to whole blocks) in the prefix cache,
  so the 16k new tokens come from more prompts, each attending over its whole context.

Each case runs the kernel once per tile configuration (`--configs`, default: the module's choice)
and the torch path `PagedAttention._prefill` (one SDPA per chunk, a gather plus a mask for cached
contexts: what attention.py does today), checks the kernel against the torch output, and prints
one JSON line per measurement: ms of one layer's call (mean over back-to-back calls, median of 5
rounds) and achieved TFLOP/s
(4 * head_dim * Hq * visible query-key pairs). stdout carries only JSON lines.

    PYTHONPATH=$PWD/engine/src python3 bench/prefill_kernel_bench.py
    PYTHONPATH=$PWD/engine/src python3 bench/prefill_kernel_bench.py --configs 128x64x8x3,64x64x4x3
    TRITON_INTERPRET=1 .venv/bin/python bench/prefill_kernel_bench.py --device cpu \
        --tokens 96 --max-len 40 --head-dim 32 --iters 1 --rounds 1   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kubellm.engine.attention import PagedAttention, SeqChunk, build_attention_metadata

HQ, HK, BLOCK_SIZE = 16, 8, 16


@dataclass(frozen=True)
class Step:
    """One prefill step: its chunks and the kernel's inputs over one layer's cache."""

    chunks: list[SeqChunk]
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_query_lens: torch.Tensor
    context_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int

    def flops(self) -> float:
        """4 * D * Hq per visible (query, key) pair: the QK^T and P.V products."""
        pairs = sum(
            c.num_new * (c.num_computed + c.num_new) - c.num_new * (c.num_new - 1) // 2
            for c in self.chunks
        )
        return 4.0 * self.q.shape[2] * self.q.shape[1] * pairs


def plan_chunks(case: str, tokens: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(cached, new) per prompt until `tokens` new tokens; the last prompt is cut to fit."""
    rng = random.Random(seed)
    chunks: list[tuple[int, int]] = []
    left = tokens
    while left > 0:
        length = rng.randint(min(100, max_len), max_len)
        cached = (length // 2) // BLOCK_SIZE * BLOCK_SIZE if case == "prefix" else 0
        new = min(length - cached, left)
        chunks.append((cached, new))
        left -= new
    return chunks


def build_step(
    chunks: list[tuple[int, int]], head_dim: int, dtype: torch.dtype, device: torch.device
) -> Step:
    """Random caches with every context at shuffled blocks; q random."""
    gen = torch.Generator(device=device).manual_seed(0)
    needed = [-(-(c + n) // BLOCK_SIZE) for c, n in chunks]
    num_blocks = sum(needed)
    perm = torch.randperm(num_blocks, generator=gen, device=device).tolist()
    seqs, rows, start = [], [], 0
    for (cached, new), k in zip(chunks, needed, strict=True):
        seqs.append(SeqChunk(cached, new, perm[start : start + k]))
        rows.append(perm[start : start + k] + [0] * (max(needed) - k))
        start += k
    shape = (num_blocks, BLOCK_SIZE, HK, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in "kv")
    new_lens = torch.tensor([n for _, n in chunks])
    total = int(new_lens.sum())
    return Step(
        chunks=seqs,
        q=torch.randn(total, HQ, head_dim, generator=gen, device=device).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        cu_query_lens=torch.cat([torch.zeros(1), new_lens.cumsum(0)]).to(device, torch.int32),
        context_lens=torch.tensor([c + n for c, n in chunks], dtype=torch.int32, device=device),
        block_table=torch.tensor(rows, dtype=torch.int32, device=device),
        max_query_len=int(new_lens.max()),
    )


def torch_path(step: Step) -> Callable[[], torch.Tensor]:
    """PagedAttention's prefill path over the same cache (the new K/V read from their slots)."""
    head_dim = step.q.shape[2]
    attn = PagedAttention(HQ, HK, head_dim)
    attn.k_cache, attn.v_cache = step.k_cache, step.v_cache
    meta = build_attention_metadata(step.chunks, BLOCK_SIZE, step.q.device)
    k = step.k_cache.view(-1, HK, head_dim)[meta.slot_mapping]
    v = step.v_cache.view(-1, HK, head_dim)[meta.slot_mapping]

    def run() -> torch.Tensor:
        out = torch.empty_like(step.q)
        if meta.decode is not None:  # 1-token chunks take the batched decode path there
            attn._decode(step.q, meta.decode, out)
        for seg in meta.prefills:
            out[seg.start : seg.end] = attn._prefill(step.q, k, v, seg)
        return out

    return run


def kernel_path(step: Step, config: Any) -> Callable[[], torch.Tensor]:
    from kubellm.engine.kernels.triton_prefill import paged_prefill_attention

    args = (step.q, step.k_cache, step.v_cache, step.cu_query_lens, step.context_lens)
    scale = step.q.shape[2] ** -0.5

    def run() -> torch.Tensor:
        return paged_prefill_attention(
            *args, step.block_table, step.max_query_len, scale, config=config
        )

    return run


def time_ms(fn: Callable[[], torch.Tensor], iters: int, rounds: int = 5) -> float:
    """Mean time of one call over `iters` back-to-back calls (the host queues ahead, as it does
    across layers in the engine), median of `rounds` rounds; CUDA events on CUDA."""
    fn()  # warm-up (compiles the kernel)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # CUDA inputs
    times = []
    for _ in range(rounds):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def parse_configs(text: str) -> list[Any]:
    """'128x64x8x3,...' (block_m x block_n x num_warps x num_stages) -> configs; '' -> default."""
    from kubellm.engine.kernels.triton_prefill import PrefillConfig

    if not text:
        return [None]
    return [PrefillConfig(*(int(x) for x in item.split("x"))) for item in text.split(",")]


def config_label(cfg: Any) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"


def bench_prefill(
    case: str,
    *,
    tokens: int = 16384,
    max_len: int = 1024,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    configs: list[Any] | None = None,
    iters: int = 20,
    rounds: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time one prefill step of `case` ('fresh' or 'prefix'): the kernel per config, then the
    torch path; one dict per measurement (ms of one layer's call, TFLOP/s, error vs torch)."""
    device = device or torch.device("cuda")
    step = build_step(plan_chunks(case, tokens, max_len, seed), head_dim, dtype, device)
    common = {
        "measurement": "prefill_attention",
        "case": case,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "chunks": len(step.chunks),
        "new_tokens": step.q.shape[0],
        "context_tokens": int(step.context_lens.sum()),
        "heads": [HQ, HK],
        "head_dim": head_dim,
    }
    baseline = torch_path(step)
    expected = baseline()
    results = []
    for cfg in configs or [None]:
        run = kernel_path(step, cfg)
        err = (run().float() - expected.float()).abs().max().item()
        ms = time_ms(run, iters, rounds)
        label = "default" if cfg is None else config_label(cfg)
        results.append(
            {
                **common,
                "impl": "triton",
                "config": label,
                "ms": round(ms, 4),
                "tflops": round(step.flops() / ms / 1e9, 1),
                "max_abs_err_vs_torch": err,
            }
        )
    ms = time_ms(baseline, iters, rounds)
    results.append(
        {
            **common,
            "impl": "torch_sdpa_per_chunk",
            "ms": round(ms, 4),
            "tflops": round(step.flops() / ms / 1e9, 1),
        }
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="fresh,prefix")
    parser.add_argument("--configs", default="", help="e.g. 128x64x8x3,64x64x4x3")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=20, help="back-to-back calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    for case in args.cases.split(","):
        for line in bench_prefill(
            case,
            tokens=args.tokens,
            max_len=args.max_len,
            head_dim=args.head_dim,
            dtype=getattr(torch, args.dtype),
            device=device,
            configs=parse_configs(args.configs),
            iters=args.iters,
            rounds=args.rounds,
        ):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

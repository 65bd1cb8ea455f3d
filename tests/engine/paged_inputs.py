"""Random paged-KV inputs for the kernel tests (test_kernels.py, test_kernels_cuda.py).

Every cache slot outside a sequence's context is NaN ("poisoned"), and block-table entries past
a context's end point at a fully poisoned block, so a kernel that reads anything it should not
returns NaN instead of a plausible number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    scale: float


def context_lengths(batch: int, block_size: int, partition: int, offset: int = 0) -> list[int]:
    """Lengths around the edges: 1, a block +-1, odd ones, several split-K partitions."""
    pool = [
        1,
        block_size - 1,
        block_size,
        block_size + 1,
        2 * block_size + 3,
        3 * partition + 5,
        partition,
        partition + 1,
    ]
    return [pool[(i + offset) % len(pool)] for i in range(batch)]


def make_decode_case(
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    pad_blocks: int = 2,
) -> DecodeCase:
    gen = torch.Generator(device=device).manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    max_blocks = max(needed, default=0) + pad_blocks
    num_blocks = sum(needed) + 1  # the last block is never part of a context
    poison = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen, device=device)
    table = torch.full((len(lens), max_blocks), poison, dtype=torch.int32, device=device)
    valid = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    start = 0
    for b, (n, k) in enumerate(zip(lens, needed, strict=True)):
        blocks = perm[start : start + k]
        start += k
        table[b, :k] = blocks.to(torch.int32)
        slots = blocks.repeat_interleave(block_size) * block_size
        slots = slots + torch.arange(block_size, device=device).repeat(k)
        valid[slots[:n]] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape, generator=gen, device=device).to(dtype)
        cache.view(num_blocks * block_size, -1)[~valid] = float("nan")
        caches.append(cache)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return DecodeCase(q, caches[0], caches[1], table, seq_lens, head_dim**-0.5)

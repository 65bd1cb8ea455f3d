# mypy: allow-untyped-defs
"""Triton varlen paged prefill attention: every prefill chunk of a step in one launch per layer.

Importing this module imports triton; only the Triton attention backend does so. The CPU tests
run the kernel under TRITON_INTERPRET=1 (see `triton_paged` for the interpreter's quirks).

`paged_prefill_attention` takes the new query tokens of all chunks back to back and reads K/V
straight from the paged cache (the chunks' own new K/V are stored there first), so chunks with a
prefix-cache hit or an earlier chunked-prefill part need no gather and no host-built mask.

Design (FlashAttention-2 style): grid (S, query tiles, Hk). One program takes one chunk, one KV
head and a tile of `BLOCK_M` rows = `BLOCK_M // GROUP_PAD` query tokens x the GROUP_PAD query
heads that share the KV head (GQA packing: each K/V tile is read once per KV head and tile of
tokens). It walks the context in tiles of `BLOCK_N` tokens, mapping positions to cache slots
through the block table, with an online softmax in float32 (exp2) and probabilities cast to the
input dtype for the P.V dot (tensor cores). Tiles wholly at or below the program's first query
position need no mask; only the diagonal tiles are masked, and the walk stops at the program's
last query position (causal), so a fresh prompt costs about half of a full square. Programs
past a chunk's end return at once; query tiles are launched in reverse order so the heaviest
(latest) tiles start first. There is no host sync: `max_query_len` comes from the host.

Tuning: `PrefillConfig` / `prefill_config` hold the tile sizes and launch options in one place;
`paged_prefill_attention(..., config=...)` overrides them (bench/prefill_kernel_bench.py sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kubellm.engine.kernels.triton_paged import _check_cache, _interpreting, _pow2

_LOG2E = 1.4426950408889634
_MIN_HEAD_DIM = 16
_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch options of the prefill kernel (powers of two)."""

    block_m: int
    """Rows of a program's tile: query tokens x the GQA group padded to a power of two (raised
    to that padded group when smaller)."""
    block_n: int
    """Context tokens per K/V tile (>= 16)."""
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> None:
        for name, value in (("block_m", self.block_m), ("block_n", self.block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError("PrefillConfig.num_warps and num_stages must be >= 1")


def prefill_config(dtype: torch.dtype, head_dim: int) -> PrefillConfig:
    """The default tiles, from a sweep on an H100 (torch 2.11, triton 3.6) at Qwen3-0.6B's shape
    (16 q / 8 KV heads, one step of 16,384 new tokens from prompts of 100-1024 tokens, see
    bench/prefill_kernel_bench.py).

    bf16/fp16, head_dim 128: 64 x 32 tiles, 4 warps, 2 stages gave 0.21 ms per layer for fresh
    prompts (223 TFLOP/s) and 0.29 ms with half of each prompt prefix-cached; 128 x 64 x 8 warps
    was 15-20 % slower, 32-row tiles ~1.7x slower. head_dim 64: the same tiles were best.
    float32 (IEEE dots, no tensor cores): 16 x 64 tiles (4.8 ms); 32 x 64 or 64 x 32 tiles fall
    off a register-spill cliff (65 ms). head_dim 256 is a guess with twice the warps (untuned).
    """
    if dtype == torch.float32:
        return PrefillConfig(block_m=16, block_n=64 if head_dim <= 128 else 32, num_warps=4)
    if head_dim <= 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    kv_head_off,
    tile_start,
    kv_end,
    q_pos,
    scale_log2,
    d,
    stride_cb,
    stride_co,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One K/V tile of the online softmax; MASKED tiles apply causality and the context end.
    Head dims below DIM_PAD (a power of two) load zeros past HEAD_DIM."""
    pos = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        valid = pos < kv_end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(table_row + pos // BLOCK_SIZE).to(tl.int64)
    kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head_off
    ptrs = kv_off[:, None] + d[None, :]
    if MASKED:
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + ptrs, mask=kv_mask, other=0.0)
    elif DIM_PAD != HEAD_DIM:
        kv_mask = (pos[:, None] >= 0) & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_cache_ptr + ptrs)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    elif UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2
    if MASKED:
        # Every row keeps at least one position in the first tile it sees (see the caller),
        # so m_new stays finite and exp2(-inf - m_new) is a clean 0 for masked positions.
        visible = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or DIM_PAD != HEAD_DIM:
        v = tl.load(v_cache_ptr + ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_cache_ptr + ptrs)
    p_lo = p.to(v.dtype)  # tensor cores take bf16/fp16 probabilities, as FlashAttention does
    if IEEE:
        pv = tl.dot(p_lo, v, input_precision="ieee")
    elif UPCAST_DOT:
        pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p_lo, v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_ptr,
    ctx_ptr,
    table_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    s_idx = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (latest) tiles launch first
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD
    q_start = tl.load(cu_ptr + s_idx)
    n_new = tl.load(cu_ptr + s_idx + 1) - q_start
    first = q_tile * TOKENS
    if first >= n_new:
        return
    context = tl.load(ctx_ptr + s_idx)
    pos0 = context - n_new  # absolute position of the chunk's first new token
    last = tl.minimum(first + TOKENS, n_new) - 1

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GROUP_PAD
    g = rows % GROUP_PAD
    d = tl.arange(0, DIM_PAD)
    row_ok = (tok < n_new) & (g < GROUP)
    io_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    heads = kv_head * GROUP + g
    token = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=io_mask,
        other=0.0,
    )
    q_pos = pos0 + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table_row = table_ptr + s_idx.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_ch
    # Positions <= the first query's are visible to every row: whole tiles there need no mask.
    # If there are none, the first masked tile starts at 0 <= every row's position.
    full_end = (pos0 + first + 1) // BLOCK_N * BLOCK_N
    kv_end = pos0 + last + 1
    for tile_start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            kv_head_off,
            tile_start,
            kv_end,
            q_pos,
            scale_log2,
            d,
            stride_cb,
            stride_co,
            BLOCK_SIZE,
            BLOCK_N,
            HEAD_DIM,
            DIM_PAD,
            False,
            IEEE,
            UPCAST_DOT,
        )
    for tile_start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            kv_head_off,
            tile_start,
            kv_end,
            q_pos,
            scale_log2,
            d,
            stride_cb,
            stride_co,
            BLOCK_SIZE,
            BLOCK_N,
            HEAD_DIM,
            DIM_PAD,
            True,
            IEEE,
            UPCAST_DOT,
        )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check_prefill_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
) -> None:
    _check_cache(k_cache, v_cache)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    if block_size & (block_size - 1):
        raise ValueError(f"the KV cache block size must be a power of two, got {block_size}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if q.dim() != 3 or q.shape[2] != head_dim or q.stride(2) != 1:
        raise ValueError(
            f"q must be [T, Hq, {head_dim}] with a contiguous last dim, got {list(q.shape)}"
        )
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads")
    meta = {"cu_query_lens": cu_query_lens, "context_lens": context_lens}
    for name, t in (*meta.items(), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    num_chunks = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if num_chunks < 0 or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be a contiguous 1-D tensor, got {context_lens.shape}")
    if cu_query_lens.shape != (num_chunks + 1,) or not cu_query_lens.is_contiguous():
        raise ValueError(f"cu_query_lens must be a contiguous [{num_chunks + 1}] tensor")
    if block_table.dim() != 2 or block_table.shape[0] != num_chunks or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be [{num_chunks}, max_blocks] with contiguous rows")
    devices = {t.device for t in (q, k_cache, v_cache, cu_query_lens, context_lens, block_table)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    _check_max_query_len(max_query_len, q.shape[0], num_chunks)


def _check_max_query_len(max_query_len: int, num_tokens: int, num_chunks: int) -> None:
    """What the host can check without reading the device's prefix sums."""
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int):
        raise ValueError(f"max_query_len must be an int, got {type(max_query_len).__name__}")
    if max_query_len < 0 or max_query_len > num_tokens:
        raise ValueError(f"max_query_len {max_query_len} is outside [0, {num_tokens}] (T)")
    if num_tokens > 0 and max_query_len * num_chunks < num_tokens:
        raise ValueError(
            f"{num_chunks} chunks of at most max_query_len={max_query_len} tokens "
            f"cannot hold {num_tokens} query tokens"
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of each chunk's new tokens over its whole context -> [T, Hq, D] in q's
    dtype.

    q [T, Hq, D] (last dim contiguous): the new tokens of all chunks back to back. Caches
    [num_blocks, block_size, Hk, D] already hold every chunk's new K/V. cu_query_lens int32
    [S + 1]: chunk s owns q rows [cu[s], cu[s+1]). context_lens int32 [S]: tokens in chunk s's
    context including its new ones. block_table int32 [S, max_blocks] (entries past a context
    are never read). max_query_len: host-known max over s of cu[s+1] - cu[s] (it sizes the grid;
    a smaller value leaves rows unwritten).

    Query row i of chunk s sits at absolute position context_lens[s] - n_s + i and attends to
    cache positions 0..that position inclusive. Chunks with n_s == 0 are allowed. The device
    metadata is trusted (no host sync): context_lens[s] >= n_s, and block_table covers it.
    `config` overrides `prefill_config(q.dtype, head_dim)`.
    """
    _check_prefill_inputs(
        q, k_cache, v_cache, cu_query_lens, context_lens, block_table, max_query_len
    )
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = _pow2(group)
    cfg = config or prefill_config(q.dtype, head_dim)
    cfg.validate()
    block_m = max(cfg.block_m, group_pad)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_chunks = context_lens.shape[0]
    if num_tokens == 0 or num_heads == 0 or num_chunks == 0:
        return out
    tokens_per_tile = block_m // group_pad
    grid = (num_chunks, triton.cdiv(max_query_len, tokens_per_tile), num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_query_lens,
        context_lens,
        block_table,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_table.stride(0),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        DIM_PAD=_pow2(head_dim, _MIN_HEAD_DIM),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        IEEE=q.dtype == torch.float32,
        UPCAST_DOT=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out

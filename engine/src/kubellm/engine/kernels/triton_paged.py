# mypy: allow-untyped-defs
"""Triton kernels for the paged KV cache: storing new K/V, and split-K GQA decode attention.

Importing this module imports triton; only the Triton attention backend does so.

CPU tests run these kernels with TRITON_INTERPRET=1 on CPU tensors. Triton decides compiled vs
interpreted when `triton.jit` wraps a function, and its own library functions (tl.zeros, tl.max,
tl.sum, ...) are wrapped when triton is first imported, so the variable must be set before the
first `import triton` of the process (tests/engine/conftest.py does so on machines without CUDA).

Decode attention (`paged_decode_attention`): grid (B, Hk, partitions). One program takes one
sequence, one KV head and one partition of the context (`partition_size` tokens), packs the
Hq/Hk query heads sharing that KV head as the rows of a `tl.dot` (so each K/V tile is read once
per KV head), and runs an online softmax over tiles of min(partition, DECODE_CONFIG.tile) tokens in float32. A reduce
kernel then combines the partitions' (max, sum, unnormalised output). With one partition the
first kernel writes the output itself. The grid depends only on B and max_blocks (host-known),
there is no host sync, so a CUDA graph can capture it for a fixed padded shape.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_PARTITION = 2048
"""At batch 256 one partition per sequence (no reduce kernel) measured fastest on an H100
(bench/RESULTS.md run 9: 2.9 TB/s of K/V against 2.7 TB/s with partitions of 512)."""
_MIN_PARTITION = 64
_TARGET_PROGRAMS = 1024
"""Partitions shrink (down to _MIN_PARTITION) until the decode grid has about this many programs,
so small batches still fill the GPU's SMs."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (tuned on the GPU: bench/decode_kernel_bench.py)."""

    tile: int = 128
    """Tokens per inner iteration (capped at the partition size)."""
    num_warps: int = 4
    num_stages: int = 3


DECODE_CONFIG = DecodeConfig()


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    # One comparison, not `(offs < n) & (slot >= 0)`: the interpreter (triton 3.9) gives a
    # tensor & scalar of booleans an int32 result that tl.load then refuses as a mask.
    mask = offs < tl.where(slot >= 0, NUM_KV_HEADS * HEAD_DIM, 0)
    row = t.to(tl.int64)
    k = tl.load(key_ptr + row * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + row * stride_vt + head * stride_vh + dim, mask=mask)
    dst = slot * stride_cs + head * stride_ch + dim
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    stride_ob,
    stride_oh,
    max_blocks,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    TILE: tl.constexpr,
    PARTITION: tl.constexpr,
    NUM_PARTITIONS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_blocks * BLOCK_SIZE)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    table_row = block_table_ptr + b.to(tl.int64) * stride_bt
    for tile_start in range(start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        valid = pos < end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        elif UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # Every tile holds at least one valid token, so m_new is finite.
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        p_lo = p.to(v.dtype)  # tensor cores take bf16/fp16 probabilities, as FlashAttention does
        if IEEE:
            pv = tl.dot(p_lo, v, input_precision="ieee")
        elif UPCAST_DOT:
            pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_lo, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_PARTITIONS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b.to(tl.int64) * num_heads + heads) * NUM_PARTITIONS + part
        tl.store(m_ptr + row, m_i, mask=g_mask)
        tl.store(l_ptr + row, l_i, mask=g_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    NUM_PARTITIONS: tl.constexpr,
    PART_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, PART_PAD)
    d = tl.arange(0, DIM_PAD)
    p_mask = p < NUM_PARTITIONS
    d_mask = d < HEAD_DIM
    row = (b.to(tl.int64) * tl.num_programs(1) + head) * NUM_PARTITIONS + p
    m = tl.load(m_ptr + row, mask=p_mask, other=float("-inf"))
    l_p = tl.load(l_ptr + row, mask=p_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # seq_len 0: every partition empty
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l_p, 0)
    acc = tl.load(
        acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    dst = out_ptr + b * stride_ob + head * stride_oh + d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def _interpreting() -> bool:
    """Whether triton runs kernels in its interpreter; its tl.dot multiplies bfloat16 operands
    as their raw uint16 bits (triton 3.9), so bf16 dots are then done on float32 copies of the
    same bf16 values (the same products; compiled kernels keep bf16 tensor-core dots)."""
    return bool(triton.knobs.runtime.interpret)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(
            f"KV caches must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError("the K and V caches must have the same shape and dtype")
    if v_cache.stride() != k_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("the K and V caches must have equal strides and a contiguous last dim")
    if k_cache.dtype not in _DTYPES:
        raise ValueError(f"unsupported KV cache dtype {k_cache.dtype}")


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hk, D] into the paged caches at `slot_mapping` [T]; slots < 0 skip."""
    _check_cache(k_cache, v_cache)
    num_tokens = key.shape[0]
    kv_shape = (num_tokens, k_cache.shape[2], k_cache.shape[3])
    if key.shape != kv_shape or value.shape != kv_shape:
        raise ValueError(
            f"key/value must be {list(kv_shape)} for these caches, "
            f"got {list(key.shape)} and {list(value.shape)}"
        )
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{num_tokens}]")
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError("the KV caches' block and offset dims must be contiguous (flat slots)")
    if num_tokens == 0:
        return
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    hk, d = kv_shape[1], kv_shape[2]
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=hk,
        HEAD_DIM=d,
        BLOCK=_pow2(hk * d),
    )


def choose_partition_size(batch: int, num_kv_heads: int, max_context: int) -> int:
    """Tokens per split-K partition: 2048, halved while the grid would have too few programs."""
    part = _MAX_PARTITION
    while part > _MIN_PARTITION and batch * num_kv_heads * -(-max_context // part) < (
        _TARGET_PROGRAMS
    ):
        part //= 2
    return part


def _check_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.stride(2) != 1:
        raise ValueError(
            f"q must be [B, Hq, {k_cache.shape[3]}] with a contiguous last dim, got {list(q.shape)}"
        )
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads"
        )
    batch = q.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be [{batch}, max_blocks] with contiguous rows")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_table and seq_lens must be int32")
    if seq_lens.shape != (batch,) or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens must be a contiguous [{batch}] tensor")
    devices = {t.device for t in (q, k_cache, v_cache, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    partition_size: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context -> [B, Hq, D] (q's dtype).

    q [B, Hq, D]; caches [num_blocks, block_size, Hk, D]; block_table int32 [B, max_blocks]
    (entries past a context's end are never read); seq_lens int32 [B], the context length
    including the new token (0 gives zeros; values beyond max_blocks * block_size are clipped).
    `partition_size` (a power of two >= 16) overrides `choose_partition_size`; `config`
    overrides `DECODE_CONFIG` (tile, warps, pipeline stages).
    """
    cfg = config or DECODE_CONFIG
    _check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_blocks = block_table.shape[1]
    max_context = max_blocks * block_size
    part = partition_size or choose_partition_size(batch, num_kv_heads, max_context)
    if part < 16 or part & (part - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {part}")
    num_parts = max(1, -(-max_context // part))
    out = torch.empty_like(q)
    if batch == 0 or num_heads == 0:
        return out
    group = num_heads // num_kv_heads
    m = l_sum = acc = out  # not touched when there is a single partition
    if num_parts > 1:
        stats = (batch, num_heads, num_parts)
        m = torch.empty(stats, dtype=torch.float32, device=q.device)
        l_sum = torch.empty(stats, dtype=torch.float32, device=q.device)
        acc = torch.empty((*stats, head_dim), dtype=torch.float32, device=q.device)
    _decode_partition_kernel[(batch, num_kv_heads, num_parts)](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        out,
        m,
        l_sum,
        acc,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        max_blocks,
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=_pow2(group, 16),
        HEAD_DIM=head_dim,
        DIM_PAD=_pow2(head_dim, 16),
        TILE=min(part, cfg.tile),
        PARTITION=part,
        NUM_PARTITIONS=num_parts,
        IEEE=q.dtype == torch.float32,
        UPCAST_DOT=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if num_parts > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            out,
            m,
            l_sum,
            acc,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            DIM_PAD=_pow2(head_dim, 16),
            NUM_PARTITIONS=num_parts,
            PART_PAD=_pow2(num_parts),
        )
    return out

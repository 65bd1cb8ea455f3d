"""Paged KV cache and the torch attention path.

Each layer's cache is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`;
the flat slot of token position p of a sequence is
`block_ids[p // block_size] * block_size + p % block_size` (the contract in `sequence.py`).

A step's batch is flattened: the new tokens of every scheduled sequence, back to back. The
per-step metadata (`AttentionMetadata`) is built once by the runner and shared by all layers.
Sequences with one new token (decodes, or a one-token chunk after a prefix hit) go through one
batched SDPA call over their contexts, gathered block by block and padded to the longest, so the
weights are read once per step for the whole batch; longer chunks (prefills) get one causal SDPA
call each.

With the "triton" backend (`PagedAttention.set_backend`, chosen by the runner from
`EngineSettings.attention_backend`), the K/V stores and attention go through our Triton kernels,
which read block tables straight from the cache instead of gathering: a decode-only step uses
the split-K decode kernel (`kernels.triton_paged`, `DecodeBatch` without a mask); any step with
a prefill chunk runs ONE varlen prefill kernel over all of its chunks, one-token chunks
included (`kernels.triton_prefill`, `VarlenBatch`). Decode-only steps on that path may replay
CUDA graphs (`kubellm.engine.cuda_graphs`), which feed static, padded `AttentionMetadata` to the
same code. The model's fused path stores K/V itself (in the q/k-norm + RoPE kernel) and calls
`PagedAttention.attend`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine.transfer import device_tensor


@dataclass(frozen=True)
class PrefillSegment:
    """A sequence with more than one new token: flat-batch tokens [start, end)."""

    start: int
    end: int
    block_table: torch.Tensor | None
    """Cache blocks holding its context [num_blocks]; None when nothing was computed before
    (then the new K/V are the whole context and are used directly)."""
    mask: torch.Tensor | None
    """[num_new, num_blocks * block_size] bool, True where a query may attend; None means
    plain causal."""


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences with one new token, attended together over padded contexts."""

    token_idx: torch.Tensor | None
    """Their positions in the flat batch [D]; None when every token of the step is one."""
    block_table: torch.Tensor
    """Cache blocks of each context, padded with block 0 [D, max_blocks] (int32)."""
    mask: torch.Tensor | None
    """[D, 1, 1, max_blocks * block_size] bool, False past each context's end (torch path;
    None when built for the Triton path, which reads `seq_lens` instead)."""
    seq_lens: torch.Tensor
    """Context length of each, including the new token [D] (int32; Triton path)."""


@dataclass(frozen=True)
class VarlenBatch:
    """Every chunk of a step, back to back, for the Triton varlen prefill kernel."""

    cu_query_lens: torch.Tensor
    """int32 [S + 1]: chunk s owns flat rows [cu[s], cu[s + 1])."""
    context_lens: torch.Tensor
    """int32 [S]: context length of each chunk, its new tokens included."""
    block_table: torch.Tensor
    """int32 [S, max_blocks]: cache blocks of each context (padding past its end)."""
    max_query_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """Where to store each new token's K/V [T] (long)."""
    decode: DecodeBatch | None
    prefills: tuple[PrefillSegment, ...]
    varlen: VarlenBatch | None = None
    """Triton path, steps with a prefill chunk: all chunks at once (then decode is None and
    prefills is empty)."""


@dataclass(frozen=True)
class SeqChunk:
    """One scheduled sequence as the attention metadata needs it."""

    num_computed: int
    num_new: int
    block_ids: list[int]


def build_attention_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device, *, backend: str = "torch"
) -> AttentionMetadata:
    """Slot mapping plus the attention description of a flattened batch of `chunks`.

    "torch": a masked decode batch plus one `PrefillSegment` per longer chunk. "triton": a
    decode-only step gets a `DecodeBatch` without mask; a step with any longer chunk gets one
    `VarlenBatch` covering every chunk.
    """
    slot_mapping: list[int] = []
    for c in chunks:
        if len(c.block_ids) * block_size < c.num_computed + c.num_new:
            raise ValueError(
                f"{len(c.block_ids)} KV blocks of {block_size} cannot hold "
                f"{c.num_computed + c.num_new} tokens"
            )
        _extend_slots(
            slot_mapping, c.block_ids, c.num_computed, c.num_computed + c.num_new, block_size
        )
    slots = device_tensor(slot_mapping, torch.long, device)
    if backend == "triton":
        if all(c.num_new == 1 for c in chunks):
            only = _decode_batch(chunks, None, block_size, device, with_mask=False)
            return AttentionMetadata(slots, only, ())
        return AttentionMetadata(slots, None, (), _varlen_batch(chunks, block_size, device))
    decode_idx: list[int] = []
    decode_chunks: list[SeqChunk] = []
    prefills: list[PrefillSegment] = []
    offset = 0
    for c in chunks:
        if c.num_new == 1:
            decode_idx.append(offset)
            decode_chunks.append(c)
        else:
            prefills.append(_prefill_segment(c, offset, block_size, device))
        offset += c.num_new
    decode: DecodeBatch | None = None
    if decode_chunks:
        all_decode = len(decode_idx) == offset
        idx = None if all_decode else device_tensor(decode_idx, torch.long, device)
        decode = _decode_batch(decode_chunks, idx, block_size, device, with_mask=True)
    return AttentionMetadata(slot_mapping=slots, decode=decode, prefills=tuple(prefills))


def _padded_table(chunks: list[SeqChunk], max_blocks: int) -> list[list[int]]:
    return [
        c.block_ids[:max_blocks] + [0] * (max_blocks - min(len(c.block_ids), max_blocks))
        for c in chunks
    ]


def _varlen_batch(chunks: list[SeqChunk], block_size: int, device: torch.device) -> VarlenBatch:
    lens = [c.num_computed + c.num_new for c in chunks]
    max_blocks = (max(lens) + block_size - 1) // block_size
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c.num_new)
    return VarlenBatch(
        cu_query_lens=device_tensor(cu, torch.int32, device),
        context_lens=device_tensor(lens, torch.int32, device),
        block_table=device_tensor(_padded_table(chunks, max_blocks), torch.int32, device),
        max_query_len=max(c.num_new for c in chunks),
    )


def _extend_slots(
    slots: list[int], blocks: list[int], start: int, end: int, block_size: int
) -> None:
    """Append the flat cache slots of positions [start, end): one range per block touched."""
    for j in range(start // block_size, (end - 1) // block_size + 1):
        base = blocks[j] * block_size - j * block_size  # slot of position p is base + p
        slots.extend(
            range(base + max(start, j * block_size), base + min(end, (j + 1) * block_size))
        )


def _prefill_segment(
    c: SeqChunk, offset: int, block_size: int, device: torch.device
) -> PrefillSegment:
    end = offset + c.num_new
    if c.num_computed == 0:
        return PrefillSegment(offset, end, None, None)
    context = c.num_computed + c.num_new
    num_blocks = (context + block_size - 1) // block_size
    table = device_tensor(c.block_ids[:num_blocks], torch.long, device)
    q_pos = torch.arange(c.num_computed, context, device=device)
    mask = torch.arange(num_blocks * block_size, device=device)[None, :] <= q_pos[:, None]
    return PrefillSegment(offset, end, table, mask)


def _decode_batch(
    chunks: list[SeqChunk],
    idx: torch.Tensor | None,
    block_size: int,
    device: torch.device,
    with_mask: bool,
) -> DecodeBatch:
    lens = [c.num_computed + 1 for c in chunks]
    max_blocks = (max(lens) + block_size - 1) // block_size
    table = device_tensor(_padded_table(chunks, max_blocks), torch.int32, device)
    lens_t = device_tensor(lens, torch.int32, device)
    if not with_mask:
        return DecodeBatch(idx, table, None, lens_t)
    mask = torch.arange(max_blocks * block_size, device=device)[None, :] < lens_t[:, None]
    return DecodeBatch(idx, table, mask[:, None, None, :], lens_t)


class PagedAttention(nn.Module):
    """Stores the new K/V in this layer's cache, then attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.backend = "torch"
        self._kernels: ModuleType | None = None
        self._prefill_kernels: ModuleType | None = None

    def set_backend(self, backend: str) -> None:
        """Use the "torch" path or the Triton kernels (imported here; the caller checked CUDA)."""
        if backend == "triton":
            from kubellm.engine.kernels import triton_paged, triton_prefill

            self._kernels = triton_paged
            self._prefill_kernels = triton_prefill
        elif backend == "torch":
            self._kernels = None
            self._prefill_kernels = None
        else:
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend = backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq * D]."""
        kernels = self._kernels
        if kernels is not None:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            return self.attend(q, meta)
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
        out = torch.empty_like(q)
        if meta.decode is not None:
            self._decode(q, meta.decode, out)
        for seg in meta.prefills:
            out[seg.start : seg.end] = self._prefill(q, k, v, seg)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Triton path, with this step's K/V already in the cache: q [T, Hq, D] -> [T, Hq * D]."""
        kernels, prefill = self._kernels, self._prefill_kernels
        if kernels is None or prefill is None:
            raise ValueError("attend() needs the triton backend (set_backend('triton'))")
        if meta.prefills:
            raise ValueError(
                "prefill segments are the torch path's; build the metadata with backend='triton'"
            )
        scale = 1.0 / math.sqrt(self.head_dim)
        if meta.varlen is not None:
            vb = meta.varlen
            out = prefill.paged_prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                vb.cu_query_lens,
                vb.context_lens,
                vb.block_table,
                vb.max_query_len,
                scale,
            )
        elif meta.decode is not None:
            if meta.decode.token_idx is not None:
                raise ValueError("a Triton decode batch covers the whole step (no token_idx)")
            out = kernels.paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.decode.block_table,
                meta.decode.seq_lens,
                scale,
            )
        else:
            raise ValueError("the attention metadata describes no tokens")
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Whole blocks [..., num_blocks] -> [..., num_blocks * block_size, Hk, D] (a copy)."""
        blocks = cache.index_select(0, table.flatten())
        return blocks.view(*table.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, batch: DecodeBatch, out: torch.Tensor) -> None:
        if batch.mask is None:
            raise ValueError("the torch decode path needs DecodeBatch.mask (built without it)")
        qd = q if batch.token_idx is None else q[batch.token_idx]
        n = qd.shape[0]
        # GQA packing: the query heads sharing a KV head become that head's "query rows".
        qd = qd.view(n, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        keys = self._gather(self.k_cache, batch.block_table).transpose(1, 2)
        values = self._gather(self.v_cache, batch.block_table).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.mask)
        o = o.reshape(n, self.num_heads, self.head_dim)
        if batch.token_idx is None:
            out.copy_(o)
        else:
            out[batch.token_idx] = o

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seg: PrefillSegment,
    ) -> torch.Tensor:
        qs = q[seg.start : seg.end].transpose(0, 1)
        if seg.block_table is None:
            keys = k[seg.start : seg.end].transpose(0, 1)
            values = v[seg.start : seg.end].transpose(0, 1)
        else:
            keys = self._gather(self.k_cache, seg.block_table).transpose(0, 1)
            values = self._gather(self.v_cache, seg.block_table).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            qs, keys, values, attn_mask=seg.mask, is_causal=seg.mask is None, enable_gqa=True
        )
        return o.transpose(0, 1)

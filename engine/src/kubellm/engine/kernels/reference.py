"""Pure-torch references of the paged kernels (float32 math; the tests' ground truth).

Cache layout (see `kubellm.engine.attention`): `[num_blocks, block_size, num_kv_heads, head_dim]`,
flat slot of a token = `block * block_size + offset`.
"""

from __future__ import annotations

import torch


def reference_store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hk, D] into the caches at `slot_mapping` [T]; slots < 0 are skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context, in float32.

    q [B, Hq, D]; block_table [B, max_blocks]; seq_lens [B] (context length including the new
    token). Returns float32 [B, Hq, D]; a sequence with seq_len 0 gets zeros.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    table = block_table.long()
    ctx = table.shape[1] * block_size
    keys = k_cache[table].float().view(batch, ctx, num_kv_heads, head_dim)
    values = v_cache[table].float().view(batch, ctx, num_kv_heads, head_dim)
    valid = torch.arange(ctx, device=q.device)[None, :] < seq_lens.long()[:, None]
    # Slots past a context's end may hold anything (even NaN): they must not reach the result.
    keys = keys.masked_fill(~valid[:, :, None, None], 0.0)
    values = values.masked_fill(~valid[:, :, None, None], 0.0)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # all-masked rows (seq_len 0) -> 0
    out = torch.einsum("bhgl,blhd->bhgd", probs, values)
    return out.reshape(batch, num_heads, head_dim)

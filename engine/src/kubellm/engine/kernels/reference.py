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


def reference_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each chunk's new tokens over its paged context, in float32.

    q [T, Hq, D]: the chunks' new tokens back to back, chunk s owning rows
    [cu_query_lens[s], cu_query_lens[s + 1]); context_lens [S] counts each context including its
    new tokens, whose K/V the caches already hold; block_table [S, max_blocks]. Query row i of
    chunk s (n_s new tokens) sits at position context_lens[s] - n_s + i and sees positions
    0..that one. Returns float32 [T, Hq, D]; rows outside every chunk are zeros.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu_query_lens.tolist()
    for s, context in enumerate(context_lens.tolist()):
        start, end = bounds[s], bounds[s + 1]
        if end == start:
            continue
        num_blocks = -(-context // block_size)
        table = block_table[s, :num_blocks].long()
        keys = k_cache[table].float().reshape(-1, num_kv_heads, head_dim)[:context]
        values = v_cache[table].float().reshape(-1, num_kv_heads, head_dim)[:context]
        q_pos = torch.arange(context - (end - start), context, device=q.device)
        visible = torch.arange(context, device=q.device)[None, :] <= q_pos[:, None]
        qs = q[start:end].float().view(end - start, num_kv_heads, group, head_dim)
        scores = torch.einsum("thgd,lhd->hgtl", qs, keys) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        o = torch.einsum("hgtl,lhd->thgd", probs, values)
        out[start:end] = o.reshape(end - start, num_heads, head_dim)
    return out


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, all in float32 (float32 result)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(first half) * second half, in float32."""
    gate, up = x.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def reference_qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    heads: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed qkv [T, (Hq + 2 Hk) D] -> float32 (q, k, v) of [T, H, D]: q and k per-head
    RMSNormed (when the weights are given), then rotated by half-split RoPE at `positions`
    (cos/sin [max_positions, D/2]); v as it is. `heads` is (Hq, Hk, D)."""
    num_heads, num_kv_heads, head_dim = heads
    t = qkv.shape[0]
    q, k, v = qkv.float().split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    q = q.reshape(t, num_heads, head_dim)
    k = k.reshape(t, num_kv_heads, head_dim)
    if q_norm_weight is not None and k_norm_weight is not None:
        q = reference_rms_norm(q, q_norm_weight, eps)
        k = reference_rms_norm(k, k_norm_weight, eps)
    c = cos[positions.long()].float().unsqueeze(1)
    s = sin[positions.long()].float().unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k), v.reshape(t, num_kv_heads, head_dim)

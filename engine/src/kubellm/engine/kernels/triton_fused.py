# mypy: allow-untyped-defs
"""Fused elementwise Triton kernels of the decoder layer: RMSNorm (+ residual add), per-head q/k
RMSNorm + RoPE + K/V cache store in one launch, and SiLU-and-mul.

Importing this module imports triton; only the Triton backend does so. CPU tests run the kernels
on CPU tensors under TRITON_INTERPRET=1 (see triton_paged.py for why the variable must be set
before triton is first imported).

Numerics: every kernel loads its inputs, computes in float32 and rounds once, at the store, to the
output dtype. The one deliberate intermediate rounding is the residual sum of `add_rms_norm`,
rounded to x's dtype before it is normalised, as the torch path (a bf16 `x + residual`) does. So
against a float32 reference on the same inputs the error is one rounding, |err| <= u * |ref| (u =
2^-8 for bfloat16, 2^-11 for float16) plus float32 noise. The torch modules in layers.py round
more often (after normalising, after the weight, after each RoPE product), so the kernels differ
from them by a few u (the tests bound it: 3u for the norms and SiLU-and-mul, 5u (|x1| + |x2|)
for RoPE). Under the interpreter, bfloat16 stores round to nearest even in software (`_cast`).

Launch configurations (grids depend only on shapes: no host sync, so CUDA graphs can capture
them):
- `rms_norm` / `add_rms_norm`: one program per token row, the whole row as one tile of
  next_power_of_two(H) (the reduction needs the row); 4 warps up to 2048 columns, 8 up to 8192,
  16 above (about 8-16 values per thread: 16-byte vector loads, no spills).
- `qk_norm_rope_store`: grid (T, head chunks) over the Hq + 2 Hk heads of the packed qkv row. A
  program takes a [heads, D/2] tile of the first and second halves of up to 1024 / (D/2) heads
  (16 heads at D 128), so Qwen3-0.6B's 32 heads are 2 programs per token: enough programs for
  batch 1 to use two SMs, few enough to stay one launch with no per-program overhead at 16k
  tokens. Query rows are normed, rotated and written to q; key rows are normed, rotated and
  stored in the cache; value rows are stored as they are. Masked stores pick the destination.
- `silu_and_mul`: grid (T, ceil(I / 1024)), 1024 columns per program with 4 warps (8 values per
  thread), so 16k x 3072 is 49k programs and streams at bandwidth while batch 1 still spreads
  over a few SMs.
- `skinny_linear`: x W^T for 1-4 rows (the model uses it for batch-1 decode steps only,
  `SKINNY_MAX_ROWS`). cuBLAS picks GEMM tiles that read the weights at about 1 TB/s there
  (bench/RESULTS.md run 9's batch-1 profile: 65 % of the step); this streams W once in
  [BLOCK_N, BLOCK_K] tiles, each program owning BLOCK_N output columns for all rows, with float32
  products summed over K. `skinny_gate_up_silu` does the MLP's gate/up projection and
  SiLU-and-mul for one row in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kubellm.engine.kernels.triton_paged import _check_cache

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_NORM_COLUMNS = 32768
"""Widest row `rms_norm` takes as one tile (hidden sizes of real models are <= 16384)."""
_TILE_ELEMENTS = 1024
"""Elements per half-tile of `qk_norm_rope_store` and per program of `silu_and_mul`."""


@triton.jit
def _cast(x, dst_ty: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x (float32) -> dst_ty rounded to nearest even. Compiled kernels round so natively; the
    interpreter (triton 3.9) truncates float32 -> bfloat16, so it rounds the bits here first."""
    if EMULATE_RNE:  # noqa: SIM102 (nested: compiled kernels never evaluate the inner test)
        if dst_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dst_ty)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to x's dtype first, like torch's `x + residual`: the stream the model keeps.
        x = _cast(x.to(tl.float32) + res.to(tl.float32), x_ptr.dtype.element_ty, EMULATE_RNE)
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * N + cols,
        _cast(xf * rstd * w, out_ptr.dtype.element_ty, EMULATE_RNE),
        mask=mask,
    )


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    qw_ptr,
    kw_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_t,
    stride_cos,
    stride_sin,
    stride_cb,
    stride_co,
    stride_ch,
    max_pos,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    HALF = HEAD_DIM // 2  # constexpr arithmetic stays constexpr
    QK_HEADS = NUM_HEADS + NUM_KV_HEADS
    ALL_HEADS = NUM_HEADS + 2 * NUM_KV_HEADS
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    tile_ok = (h < ALL_HEADS)[:, None] & j_ok[None, :]
    src = qkv_ptr + t * stride_t + h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(src, mask=tile_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=tile_ok, other=0.0).to(tl.float32)
    is_q = (h < NUM_HEADS)[:, None]
    is_qk = (h < QK_HEADS)[:, None]
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x1 * x1 + x2 * x2, 1) / HEAD_DIM + eps)
        wq1 = tl.load(qw_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        wq2 = tl.load(qw_ptr + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        wk1 = tl.load(kw_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        wk2 = tl.load(kw_ptr + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        y1 = x1 * rstd[:, None] * tl.where(is_q, wq1, wk1)
        y2 = x2 * rstd[:, None] * tl.where(is_q, wq2, wk2)
    else:
        y1 = x1
        y2 = x2
    # Out-of-range positions are clamped (never read out of bounds); callers keep them in range.
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + t).to(tl.int64), 0), max_pos - 1)
    c = tl.load(cos_ptr + pos * stride_cos + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    # Value rows are neither normed nor rotated.
    o1 = tl.where(is_qk, y1 * c - y2 * s, x1)
    o2 = tl.where(is_qk, y2 * c + y1 * s, x2)

    q_dst = q_ptr + t * (NUM_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + j[None, :]
    q_ok = tile_ok & is_q
    tl.store(q_dst, _cast(o1, q_ptr.dtype.element_ty, EMULATE_RNE), mask=q_ok)
    tl.store(q_dst + HALF, _cast(o2, q_ptr.dtype.element_ty, EMULATE_RNE), mask=q_ok)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    # Limits on head indices, not `& (slot >= 0)`: the interpreter (triton 3.9) turns a tensor &
    # scalar of booleans into int32, which tl.store refuses as a mask. slot < 0: store nothing.
    k_end = tl.where(slot >= 0, QK_HEADS, NUM_HEADS)
    v_end = tl.where(slot >= 0, ALL_HEADS, QK_HEADS)
    is_k = ((h >= NUM_HEADS) & (h < k_end))[:, None]
    is_v = ((h >= QK_HEADS) & (h < v_end))[:, None]
    base = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + j[None, :]
    k_dst = k_cache_ptr + base + (h - NUM_HEADS)[:, None] * stride_ch
    v_dst = v_cache_ptr + base + (h - QK_HEADS)[:, None] * stride_ch
    k_ok = tile_ok & is_k
    v_ok = tile_ok & is_v
    tl.store(k_dst, _cast(o1, k_cache_ptr.dtype.element_ty, EMULATE_RNE), mask=k_ok)
    tl.store(k_dst + HALF, _cast(o2, k_cache_ptr.dtype.element_ty, EMULATE_RNE), mask=k_ok)
    tl.store(v_dst, _cast(o1, v_cache_ptr.dtype.element_ty, EMULATE_RNE), mask=v_ok)
    tl.store(v_dst + HALF, _cast(o2, v_cache_ptr.dtype.element_ty, EMULATE_RNE), mask=v_ok)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, inter, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    src = x_ptr + row * stride_x + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(
        out_ptr + row * inter + cols, _cast(out, out_ptr.dtype.element_ty, EMULATE_RNE), mask=mask
    )


SKINNY_MAX_ROWS = 1
"""Rows up to which the Linear layers use `skinny_linear` instead of cuBLAS. On an H200 it read a
batch-1 step's weights twice as fast as cuBLAS, but at 4 rows it was slower (bench/RESULTS.md
run 10), so only batch 1 uses it."""
_SKINNY_KERNEL_ROWS = 4
"""Rows the kernel itself takes (one unrolled accumulator each)."""


@triton.jit
def _skinny_row(x_ptr, row, M, K, stride_xm, k, w, acc):
    """acc [BLOCK_N, BLOCK_K] += w * x[row, k] (float32; rows >= M read zeros)."""
    # One comparison, not `(k < K) & (row < M)`: the interpreter gives tensor & scalar booleans
    # an int32 result that tl.load refuses as a mask (see triton_paged).
    x = tl.load(x_ptr + row * stride_xm + k, mask=k < tl.where(row < M, K, 0), other=0.0)
    return acc + w * x.to(tl.float32)[None, :]


@triton.jit
def _skinny_store(out_ptr, b_ptr, row, M, N, stride_om, n, acc, HAS_BIAS, EMULATE_RNE):
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    dst = out_ptr + row * stride_om + n
    tl.store(dst, _cast(y, out_ptr.dtype.element_ty, EMULATE_RNE), mask=n < tl.where(row < M, N, 0))


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    # One 2D [BLOCK_N, BLOCK_K] float32 accumulator per row (unrolled, BLOCK_M <= 4): products
    # add up elementwise and are summed over K once at the end, so the loop has no reduction
    # and no 3D layout conversions.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        acc0 = _skinny_row(x_ptr, 0, M, K, stride_xm, k, w, acc0)
        if BLOCK_M > 1:
            acc1 = _skinny_row(x_ptr, 1, M, K, stride_xm, k, w, acc1)
        if BLOCK_M > 2:
            acc2 = _skinny_row(x_ptr, 2, M, K, stride_xm, k, w, acc2)
            acc3 = _skinny_row(x_ptr, 3, M, K, stride_xm, k, w, acc3)
    _skinny_store(out_ptr, b_ptr, 0, M, N, stride_om, n, acc0, HAS_BIAS, EMULATE_RNE)
    if BLOCK_M > 1:
        _skinny_store(out_ptr, b_ptr, 1, M, N, stride_om, n, acc1, HAS_BIAS, EMULATE_RNE)
    if BLOCK_M > 2:
        _skinny_store(out_ptr, b_ptr, 2, M, N, stride_om, n, acc2, HAS_BIAS, EMULATE_RNE)
        _skinny_store(out_ptr, b_ptr, 3, M, N, stride_om, n, acc3, HAS_BIAS, EMULATE_RNE)


def _check_projection(name: str, x: torch.Tensor, weight: torch.Tensor, rows_label: str) -> None:
    """x [M, K] rows and a [rows_label, K] weight of x's dtype with a contiguous last dim."""
    _check_rows("x", x)
    k_dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != k_dim or weight.stride(1) != 1:
        raise ValueError(
            f"{name}: weight must be [{rows_label}, {k_dim}] with a contiguous last dim, "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"{name}: weight is {weight.dtype} but x is {x.dtype}")


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of `skinny_linear` (swept by bench/skinny_linear_bench.py)."""

    block_n: int = 8
    """Output columns per program (halved for N < 2048, so small layers get more programs)."""
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


SKINNY_CONFIG = SkinnyConfig()


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 4) @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype.
    `config` overrides `SKINNY_CONFIG` (and its halving for narrow layers)."""
    _check_projection("skinny_linear", x, weight, "N")
    rows, k_dim = x.shape
    if rows > _SKINNY_KERNEL_ROWS:
        raise ValueError(f"skinny_linear takes at most {_SKINNY_KERNEL_ROWS} rows, got {rows}")
    n_dim = weight.shape[0]
    if bias is not None:
        _check_weight("bias", bias, n_dim)
    _check_devices(x=x, weight=weight, bias=bias)
    out = torch.empty((rows, n_dim), dtype=x.dtype, device=x.device)
    if rows == 0 or n_dim == 0:
        return out
    if k_dim == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(rows, n_dim))
    cfg = config or SKINNY_CONFIG
    block_n = cfg.block_n if config is not None or n_dim >= 2048 else max(1, cfg.block_n // 2)
    _skinny_linear_kernel[(triton.cdiv(n_dim, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        rows,
        n_dim,
        k_dim,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=_pow2(rows),
        BLOCK_N=block_n,
        BLOCK_K=min(cfg.block_k, max(16, _pow2(k_dim))),
        EMULATE_RNE=_interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


@triton.jit
def _skinny_gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    inter,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    """One row: out[j] = silu(x . W[j]) * (x . W[inter + j]), with gate and up rounded to the
    dtype first, as the unfused projection + `silu_and_mul` do."""
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < inter
    gate_rows = w_ptr + j.to(tl.int64)[:, None] * stride_wn
    up_rows = w_ptr + (j + inter).to(tl.int64)[:, None] * stride_wn
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_mask = j_ok[:, None] & k_ok[None, :]
        acc_gate += tl.load(gate_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_rows + k[None, :], mask=w_mask, other=0.0).to(tl.float32) * x
    dtype = out_ptr.dtype.element_ty
    gate = _cast(tl.sum(acc_gate, axis=1), dtype, EMULATE_RNE).to(tl.float32)
    up = _cast(tl.sum(acc_up, axis=1), dtype, EMULATE_RNE).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + j, _cast(out, dtype, EMULATE_RNE), mask=j_ok)


def skinny_gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One row: `silu_and_mul(skinny_linear(x, weight))` in one launch. x [1, K], weight
    [2I, K] (the packed gate/up projection) -> [1, I] in x's dtype."""
    _check_projection("skinny_gate_up_silu", x, weight, "2I")
    rows, k_dim = x.shape
    if rows != 1:
        raise ValueError(f"skinny_gate_up_silu takes exactly one row, got {rows}")
    if weight.shape[0] % 2:
        raise ValueError(
            f"the packed gate/up weight needs an even row count, got {weight.shape[0]}"
        )
    _check_devices(x=x, weight=weight)
    inter = weight.shape[0] // 2
    out = torch.empty((1, inter), dtype=x.dtype, device=x.device)
    if inter == 0 or k_dim == 0:
        return out.zero_()
    cfg = SKINNY_CONFIG
    block_n = max(1, cfg.block_n // 2)  # two weight rows per output column
    _skinny_gate_up_silu_kernel[(triton.cdiv(inter, block_n),)](
        x,
        weight,
        out,
        inter,
        k_dim,
        weight.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=min(cfg.block_k, max(16, _pow2(k_dim))),
        EMULATE_RNE=_interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (see `_cast`)."""
    return bool(triton.knobs.runtime.interpret)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _check_rows(name: str, x: torch.Tensor) -> None:
    """x must be a 2D [T, N] float tensor whose last dim is contiguous (rows may be strided)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2D [tokens, features], got shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")


def _check_devices(**tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        names = ", ".join(f"{k}={t.device}" for k, t in tensors.items() if t is not None)
        raise ValueError(f"all inputs must be on one device, got {names}")


def _check_weight(name: str, weight: torch.Tensor, size: int) -> None:
    if weight.shape != (size,) or not weight.is_contiguous() or weight.dtype not in _DTYPES:
        raise ValueError(
            f"{name} must be a contiguous float [{size}] tensor, got "
            f"{weight.dtype} {list(weight.shape)}"
        )


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rows("x", x)
    tokens, hidden = x.shape
    _check_weight("weight", weight, hidden)
    if residual is not None:
        _check_rows("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({x.dtype} {list(x.shape)}), "
                f"got {residual.dtype} {list(residual.shape)}"
            )
    _check_devices(x=x, residual=residual, weight=weight)
    if hidden > _MAX_NORM_COLUMNS:
        raise ValueError(f"rms_norm takes rows of at most {_MAX_NORM_COLUMNS}, got {hidden}")
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if tokens == 0 or hidden == 0:
        return out, res_out
    block = _pow2(hidden)
    _rms_norm_kernel[(tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        float(eps),
        N=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        EMULATE_RNE=_interpreting(),
        num_warps=_norm_warps(block),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (last dim contiguous) -> weight * rmsnorm(x), [T, H] in x's dtype."""
    return _launch_rms_norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual (rounded to x's dtype, as torch's bf16 add does); returns
    (weight * rmsnorm(r), r). New tensors (inputs untouched)."""
    return _launch_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I] in x's dtype."""
    _check_rows("x", x)
    tokens, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dim [T, 2I], got {width}")
    inter = width // 2
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(_TILE_ELEMENTS, _pow2(inter))
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), inter, BLOCK=block, EMULATE_RNE=_interpreting(), num_warps=4
    )
    return out


def _check_qk_inputs(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: tuple[int, int, int],
) -> None:
    num_heads, num_kv_heads, head_dim = heads
    if num_heads < 1 or num_kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"need num_heads >= 1, num_kv_heads >= 1 and an even head_dim >= 2, got "
            f"{num_heads}, {num_kv_heads}, {head_dim}"
        )
    _check_rows("qkv", qkv)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [T, (num_heads + 2 * num_kv_heads) * head_dim] = [T, {width}], "
            f"got {list(qkv.shape)}"
        )
    if positions.shape != (qkv.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{qkv.shape[0]}]")
    rope_shape = (cos.shape[0], head_dim // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape != rope_shape or table.shape[0] < 1:
            raise ValueError(
                f"{name} must be [max_positions, {head_dim // 2}] like cos, got {list(table.shape)}"
            )
        if table.dtype not in _DTYPES or table.stride(1) != 1:
            raise ValueError(f"{name} must be a float tensor with a contiguous last dim")


def _check_qk_norm(
    q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, head_dim: int
) -> None:
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be given or both be None")
    if q_norm_weight is not None and k_norm_weight is not None:
        _check_weight("q_norm_weight", q_norm_weight, head_dim)
        _check_weight("k_norm_weight", k_norm_weight, head_dim)


def _check_kv_store(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    tokens: int,
) -> None:
    _check_cache(k_cache, v_cache)
    if k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"KV caches must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {list(k_cache.shape)}"
        )
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{tokens}]")


def qk_norm_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Returns q [T, Hq, D] (normed if q_norm_weight, then rotated), contiguous, in qkv's dtype.
    Writes k (normed if k_norm_weight, rotated) and v (as is) into the caches at slot_mapping.

    qkv [T, (Hq + 2 Hk) D] is the packed projection (last dim contiguous); positions [T] index
    the rows of cos/sin [max_positions, D/2] (half-split "neox" RoPE); the caches are
    [num_blocks, block_size, Hk, D]; slot_mapping [T] gives block * block_size + offset, and a
    slot < 0 stores nothing (CUDA-graph padding rows). One launch, no host sync.
    """
    _check_qk_inputs(qkv, positions, cos, sin, (num_heads, num_kv_heads, head_dim))
    _check_qk_norm(q_norm_weight, k_norm_weight, head_dim)
    tokens = qkv.shape[0]
    _check_kv_store(k_cache, v_cache, slot_mapping, num_kv_heads, head_dim, tokens)
    _check_devices(
        qkv=qkv,
        positions=positions,
        cos=cos,
        sin=sin,
        q_norm_weight=q_norm_weight,
        k_norm_weight=k_norm_weight,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slot_mapping,
    )
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    half_pad = _pow2(head_dim // 2)
    all_heads = num_heads + 2 * num_kv_heads
    head_block = min(_pow2(all_heads), max(1, _TILE_ELEMENTS // half_pad))
    has_norm = q_norm_weight is not None
    _qk_norm_rope_store_kernel[(tokens, triton.cdiv(all_heads, head_block))](
        qkv,
        positions,
        cos,
        sin,
        q_norm_weight if q_norm_weight is not None else cos,
        k_norm_weight if k_norm_weight is not None else cos,
        q,
        k_cache,
        v_cache,
        slot_mapping,
        qkv.stride(0),
        cos.stride(0),
        sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        cos.shape[0],
        float(eps),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF_PAD=half_pad,
        HEAD_BLOCK=head_block,
        BLOCK_SIZE=k_cache.shape[1],
        HAS_NORM=has_norm,
        EMULATE_RNE=_interpreting(),
        num_warps=4,
    )
    return q

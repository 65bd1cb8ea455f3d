"""Fused Triton kernels (RMSNorm + residual, q/k-norm + RoPE + K/V store, SiLU-and-mul) against
float32 torch references, and against the torch modules of layers.py.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (tests/engine/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported); with CUDA the same tests run the
compiled kernels on the GPU:
    python3 -m pytest -c /dev/null --rootdir . -p no:cacheprovider -q tests/engine/test_fused_kernels.py

Error bounds asserted. Each kernel computes in float32 and rounds once to the output dtype, so
against the float32 reference on the same inputs |err| <= atol + rtol * |ref| with
- float32: atol 1e-5, rtol 1e-5;
- bfloat16: atol 1e-5, rtol 2^-8 + 1e-5 (one rounding to nearest, 8 significant bits);
- float16: atol 1e-5, rtol 2^-11 + 1e-5 (11 significant bits).
The atol covers float32 cancellation in RoPE (|x1 cos - x2 sin| near 0). The residual sum of
`add_rms_norm` is bit-identical to torch's `x + residual`, and values are stored in the cache
exactly. Against the torch modules, which round after each op, the bounds are 3u |ref| (RMSNorm,
SiLU-and-mul) and 5u (|y1| + |y2|) for RoPE outputs (y: the normed halves), u as above.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch
from kernel_modules import triton_module  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.kernels.reference import (
    reference_qk_norm_rope,
    reference_rms_norm,
    reference_silu_and_mul,
)
from kubellm.engine.layers import RMSNorm, RotaryEmbedding, SiluAndMul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
UNIT_ROUNDOFF = {F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}
TOLERANCE = {dtype: (1e-5, u + 1e-5) for dtype, u in UNIT_ROUNDOFF.items()}  # (atol, rtol)
EPS = 1e-6
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The fused kernel module, interpreted on CPU (fails loudly if that cannot work)."""
    return triton_module("triton_fused")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)


def _rows(gen: torch.Generator, tokens: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, width] whose rows are strided (a column slice of a wider tensor)."""
    return _randn(gen, tokens, width + 3, dtype=dtype)[:, :width]


def _weight(gen: torch.Generator, size: int, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 + 0.2 * _randn(gen, size)).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound elementwise (+1e-5 for float32 noise near zero)."""
    excess = (actual.float() - expected.float()).abs() - bound - 1e-5
    assert excess.max().item() <= 0, f"bound exceeded by {excess.max().item():.3g}"


# ---- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "hidden", "dtype"),
    [(0, 64, BF16), (1, 64, F32), (3, 100, BF16), (17, 33, F16), (64, 128, BF16)],
)
def test_add_rms_norm_matches_reference(
    kernels: ModuleType, tokens: int, hidden: int, dtype: torch.dtype
) -> None:
    gen = _gen(tokens + hidden)
    x, residual = _rows(gen, tokens, hidden, dtype), _rows(gen, tokens, hidden, dtype)
    weight = _weight(gen, hidden, dtype)
    x_in, res_in = x.clone(), residual.clone()
    out, new_residual = kernels.add_rms_norm(x, residual, weight, EPS)
    assert out.shape == new_residual.shape == (tokens, hidden)
    assert out.dtype == new_residual.dtype == dtype and out.is_contiguous()
    assert torch.equal(new_residual, x + residual), "the residual sum must be torch's, bit for bit"
    _close(out, reference_rms_norm(x + residual, weight, EPS), dtype)
    assert torch.equal(x, x_in) and torch.equal(residual, res_in), "inputs must stay untouched"


@pytest.mark.parametrize(
    ("tokens", "hidden", "dtype"), [(0, 8, F32), (1, 64, F16), (3, 100, F32), (17, 48, BF16)]
)
def test_rms_norm_matches_reference(
    kernels: ModuleType, tokens: int, hidden: int, dtype: torch.dtype
) -> None:
    gen = _gen(tokens * hidden + 1)
    x, weight = _rows(gen, tokens, hidden, dtype), _weight(gen, hidden, dtype)
    out = kernels.rms_norm(x, weight, EPS)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    _close(out, reference_rms_norm(x, weight, EPS), dtype)


# ---- SiLU-and-mul ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "inter", "dtype"),
    [(0, 8, F32), (1, 64, BF16), (3, 25, F16), (17, 1100, BF16), (64, 48, F32)],
)
def test_silu_and_mul_matches_reference(
    kernels: ModuleType, tokens: int, inter: int, dtype: torch.dtype
) -> None:
    """Odd widths and 1100 > 1024 (two column blocks per row), strided rows."""
    x = 3.0 * _rows(_gen(inter), tokens, 2 * inter, dtype)
    out = kernels.silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype and out.is_contiguous()
    _close(out, reference_silu_and_mul(x), dtype)


# ---- q/k norm + RoPE + K/V store ---------------------------------------------------------------


def _slots(tokens: int, num_blocks: int, block_size: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct slots, the first ones at block ends and starts; every fifth row from the third
    is padding (-1)."""
    special = [block_size - 1, num_blocks * block_size - 1, block_size, 2 * block_size - 1]
    perm = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE).tolist()
    slots = (special + [s for s in perm if s not in special])[:tokens]
    for i in range(2, tokens, 5):
        slots[i] = -1
    return torch.tensor(slots, dtype=torch.int64, device=DEVICE)


def _rope_tables(
    gen: torch.Generator, positions: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = torch.rand(head_dim // 2, generator=gen, device=DEVICE)
    angles = torch.outer(torch.arange(positions, device=DEVICE, dtype=F32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _check_qk(
    kernels: ModuleType,
    tokens: int,
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    with_norm: bool,
) -> None:
    hq, hk, d = heads
    gen = _gen(tokens * 31 + d)
    block_size = 8
    num_blocks = max(4, tokens // block_size + 2)
    qkv = _rows(gen, tokens, (hq + 2 * hk) * d, dtype)
    positions = torch.randint(0, 40, (tokens,), generator=gen, device=DEVICE)
    cos, sin = _rope_tables(gen, 40, d, dtype)
    qw = _weight(gen, d, dtype) if with_norm else None
    kw = _weight(gen, d, dtype) if with_norm else None
    k_cache = _randn(gen, num_blocks, block_size, hk, d, dtype=dtype)
    v_cache = _randn(gen, num_blocks, block_size, hk, d, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = _slots(tokens, num_blocks, block_size, gen)

    q = kernels.qk_norm_rope_store(
        qkv, positions, cos, sin, qw, kw, EPS, hq, hk, d, k_cache, v_cache, slots
    )
    q_ref, k_ref, v_ref = reference_qk_norm_rope(qkv, positions, cos, sin, qw, kw, EPS, heads)
    assert q.shape == (tokens, hq, d) and q.dtype == dtype and q.is_contiguous()
    _close(q, q_ref, dtype)
    keep = slots >= 0
    written = slots[keep]
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for cache, before in ((k_cache, k_before), (v_cache, v_before)):
        flat, flat_before = cache.view(-1, hk, d), before.view(-1, hk, d)
        assert torch.equal(flat[untouched], flat_before[untouched]), "a padding row was stored"
    _close(k_cache.view(-1, hk, d)[written], k_ref[keep], dtype)
    assert torch.equal(v_cache.view(-1, hk, d)[written], v_ref[keep].to(dtype))


@pytest.mark.parametrize(
    ("tokens", "heads", "dtype", "with_norm"),
    [
        (0, (2, 1, 32), F32, True),
        (1, (2, 1, 32), BF16, False),
        (3, (4, 4, 64), F16, True),
        (17, (4, 2, 64), BF16, True),
        (5, (8, 2, 256), F32, True),  # 12 heads of 256: two head chunks, the second partial
        (4, (2, 1, 48), BF16, True),  # head_dim not a power of two (masked)
        (64, (2, 1, 32), F32, False),
    ],
)
def test_qk_norm_rope_store_matches_reference(
    kernels: ModuleType,
    tokens: int,
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    with_norm: bool,
) -> None:
    _check_qk(kernels, tokens, heads, dtype, with_norm)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize(("tokens", "heads"), [(3, (2, 2, 128)), (17, (4, 1, 32)), (9, (6, 2, 64))])
def test_qk_norm_rope_store_grid(
    kernels: ModuleType,
    tokens: int,
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    with_norm: bool,
) -> None:
    _check_qk(kernels, tokens, heads, dtype, with_norm)


def test_qk_int32_indices(kernels: ModuleType) -> None:
    """int32 positions and slots give the same result as int64."""
    gen = _gen(5)
    qkv = _randn(gen, 6, 4 * 32)
    cos, sin = _rope_tables(gen, 16, 32, F32)
    positions = torch.tensor([0, 15, 3, 3, 7, 1], device=DEVICE)
    slots = torch.tensor([7, -1, 8, 0, 15, 2], device=DEVICE)
    outs = []
    for index_dtype in (torch.int64, torch.int32):
        caches = [torch.zeros(2, 8, 1, 32, device=DEVICE) for _ in range(2)]
        q = kernels.qk_norm_rope_store(
            qkv, positions.to(index_dtype), cos, sin, None, None, EPS, 2, 1, 32,
            *caches, slots.to(index_dtype),
        )  # fmt: skip
        outs.append((q, *caches))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)


# ---- the fused path equals the torch modules of layers.py --------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_matches_torch_modules(kernels: ModuleType, dtype: torch.dtype) -> None:
    """A tiny Qwen3-like layer: add_forward, per-head q/k norm + RotaryEmbedding, SiluAndMul."""
    gen = _gen(7)
    tokens, hidden, hq, hk, d, u = 9, 64, 4, 2, 32, UNIT_ROUNDOFF[dtype]
    norm, q_norm, k_norm = RMSNorm(hidden, EPS), RMSNorm(d, EPS), RMSNorm(d, EPS)
    for module, size in ((norm, hidden), (q_norm, d), (k_norm, d)):
        module.weight.data = _weight(gen, size, dtype)
    rope = RotaryEmbedding(d, 32, 10000.0, None, dtype).to(DEVICE)
    x, residual = _randn(gen, tokens, hidden, dtype=dtype), _randn(gen, tokens, hidden, dtype=dtype)

    h, new_res = kernels.add_rms_norm(x, residual, norm.weight, EPS)
    h_ref, res_ref = norm.add_forward(x, residual)
    assert torch.equal(new_res, res_ref)
    _within(h, h_ref, 3 * u * reference_rms_norm(res_ref, norm.weight, EPS).abs())

    qkv = _randn(gen, tokens, (hq + 2 * hk) * d, dtype=dtype)
    positions = torch.randint(0, 32, (tokens,), generator=gen, device=DEVICE)
    caches = [torch.zeros(4, 4, hk, d, dtype=dtype, device=DEVICE) for _ in range(2)]
    slots = torch.arange(tokens, device=DEVICE)
    q = kernels.qk_norm_rope_store(
        qkv, positions, rope.cos, rope.sin, q_norm.weight, k_norm.weight, EPS, hq, hk, d,
        *caches, slots,
    )  # fmt: skip
    tq, tk, tv = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q_mod = q_norm(tq.reshape(tokens, hq, d))
    k_mod = k_norm(tk.reshape(tokens, hk, d))
    q_ref, k_ref = rope(positions, q_mod, k_mod)
    for out, ref, pre in ((q, q_ref, q_mod), (caches[0].view(-1, hk, d)[:tokens], k_ref, k_mod)):
        y1, y2 = pre.float().abs().chunk(2, dim=-1)
        _within(out, ref, (5 * u * (y1 + y2)).repeat(1, 1, 2))
    assert torch.equal(caches[1].view(-1, hk, d)[:tokens], tv.reshape(tokens, hk, d))

    gate_up = 3.0 * _randn(gen, tokens, 96, dtype=dtype)
    act_ref = SiluAndMul()(gate_up)
    _within(kernels.silu_and_mul(gate_up), act_ref, 3 * u * reference_silu_and_mul(gate_up).abs())


# ---- bad input, and no launch for empty batches ------------------------------------------------


def test_empty_batches_launch_nothing(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_rms_norm_kernel", "_qk_norm_rope_store_kernel", "_silu_and_mul_kernel"):
        monkeypatch.setattr(kernels, name, None)  # indexing None would raise
    empty = torch.empty(0, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    assert kernels.rms_norm(empty, weight, EPS).shape == (0, 64)
    assert kernels.add_rms_norm(empty, empty, weight, EPS)[1].shape == (0, 64)
    assert kernels.silu_and_mul(empty).shape == (0, 32)
    cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    q = kernels.qk_norm_rope_store(
        empty, none, weight.view(8, 8), weight.view(8, 8), None, None, EPS, 2, 1, 16,
        cache, cache.clone(), none,
    )  # fmt: skip
    assert q.shape == (0, 2, 16)


def test_refuses_bad_input(kernels: ModuleType) -> None:
    x = torch.zeros(3, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="2D"):
        kernels.rms_norm(x.view(3, 8, 8), w, EPS)
    with pytest.raises(ValueError, match="contiguous last dim"):
        kernels.rms_norm(torch.zeros(64, 3, device=DEVICE).t(), w, EPS)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.rms_norm(x, w[:32], EPS)
    with pytest.raises(ValueError, match="residual must match"):
        kernels.add_rms_norm(x, x.half(), w, EPS)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.silu_and_mul(x.long())
    with pytest.raises(ValueError, match="even last dim"):
        kernels.silu_and_mul(x[:, :63])


def test_qk_refuses_bad_input(kernels: ModuleType) -> None:
    hq, hk, d = 2, 1, 16
    qkv = torch.zeros(3, (hq + 2 * hk) * d, device=DEVICE)
    pos = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    table = torch.zeros(8, d // 2, device=DEVICE)
    cache = torch.zeros(2, 4, hk, d, device=DEVICE)
    w = torch.ones(d, device=DEVICE)

    def call(**changes: object) -> None:
        args: dict[str, object] = dict(
            qkv=qkv, positions=pos, cos=table, sin=table, q_norm_weight=w, k_norm_weight=w,
            eps=EPS, num_heads=hq, num_kv_heads=hk, head_dim=d, k_cache=cache,
            v_cache=cache.clone(), slot_mapping=pos,
        )  # fmt: skip
        kernels.qk_norm_rope_store(**(args | changes))

    call()  # the baseline is valid
    cases: list[tuple[str, dict[str, object]]] = [
        ("qkv must be", {"qkv": qkv[:, :-d]}),
        ("even head_dim", {"head_dim": 15}),
        ("both be given", {"k_norm_weight": None}),
        ("q_norm_weight must be", {"q_norm_weight": w[:8]}),
        ("positions must be", {"positions": pos.float()}),
        ("sin must be", {"sin": table[:, :4]}),
        ("KV caches must be", {"k_cache": cache[:, :, :, :8], "v_cache": cache[:, :, :, :8]}),
        ("same shape and dtype", {"v_cache": cache.half()}),
        ("slot_mapping must be", {"slot_mapping": pos[:2]}),
    ]
    for message, changes in cases:
        with pytest.raises(ValueError, match=message):
            call(**changes)


# ---- CUDA only: Qwen3-0.6B shapes, and capture in a CUDA graph ----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
QWEN3_HIDDEN, QWEN3_HEADS, QWEN3_INTER = 1024, (16, 8, 128), 3072


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 256, 2048])
def test_qwen3_shapes_compiled(kernels: ModuleType, tokens: int) -> None:
    """bfloat16 at the benchmark model's shapes: decode batches and a prefill chunk."""
    gen = _gen(tokens)
    hidden, inter = QWEN3_HIDDEN, QWEN3_INTER
    x, residual = _randn(gen, tokens, hidden, dtype=BF16), _randn(gen, tokens, hidden, dtype=BF16)
    weight = _weight(gen, hidden, BF16)
    out, new_res = kernels.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(new_res, x + residual)
    _close(out, reference_rms_norm(x + residual, weight, EPS), BF16)
    gate_up = 3.0 * _randn(gen, tokens, 2 * inter, dtype=BF16)
    _close(kernels.silu_and_mul(gate_up), reference_silu_and_mul(gate_up), BF16)
    _check_qk(kernels, tokens, QWEN3_HEADS, BF16, True)


def _layer_ops(kernels: ModuleType, t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The four fused launches of one decoder layer, on the tensors of `t`."""
    hq, hk, d = QWEN3_HEADS
    h, res = kernels.add_rms_norm(t["x"], t["residual"], t["w"], EPS)
    q = kernels.qk_norm_rope_store(
        t["qkv"], t["positions"], t["cos"], t["sin"], t["qw"], t["kw"], EPS, hq, hk, d,
        t["k_cache"], t["v_cache"], t["slots"],
    )  # fmt: skip
    return [h, res, q, kernels.silu_and_mul(t["gate_up"]), kernels.rms_norm(t["x"], t["w"], EPS)]


def _layer_inputs(gen: torch.Generator, tokens: int) -> dict[str, torch.Tensor]:
    hq, hk, d = QWEN3_HEADS
    hidden, inter = QWEN3_HIDDEN, QWEN3_INTER
    cos, sin = _rope_tables(gen, 64, d, BF16)
    slots = torch.randperm(8 * 16, generator=gen, device=DEVICE)[:tokens]
    slots[::3] = -1
    return {
        "x": _randn(gen, tokens, hidden, dtype=BF16),
        "residual": _randn(gen, tokens, hidden, dtype=BF16),
        "w": _weight(gen, hidden, BF16),
        "qkv": _randn(gen, tokens, (hq + 2 * hk) * d, dtype=BF16),
        "positions": torch.randint(0, 64, (tokens,), generator=gen, device=DEVICE),
        "cos": cos,
        "sin": sin,
        "qw": _weight(gen, d, BF16),
        "kw": _weight(gen, d, BF16),
        "k_cache": _randn(gen, 8, 16, hk, d, dtype=BF16),
        "v_cache": _randn(gen, 8, 16, hk, d, dtype=BF16),
        "slots": slots,
        "gate_up": _randn(gen, tokens, 2 * inter, dtype=BF16),
    }


@needs_cuda
def test_capture_in_cuda_graph(kernels: ModuleType) -> None:
    """The launches capture (no host sync), and a replay on new inputs equals eager calls."""
    tokens = 24
    static = _layer_inputs(_gen(1), tokens)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _layer_ops(kernels, static)  # compile before capturing
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = _layer_ops(kernels, static)
    fresh = _layer_inputs(_gen(2), tokens)
    for name, tensor in fresh.items():
        static[name].copy_(tensor)
    graph.replay()
    eager_outs = _layer_ops(kernels, fresh)
    torch.cuda.synchronize()
    for got, want in zip(graph_outs, eager_outs, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(static["k_cache"], fresh["k_cache"])
    assert torch.equal(static["v_cache"], fresh["v_cache"])


# ---- skinny_linear (decode batches of 1-4 rows) -----------------------------------------------


@pytest.mark.parametrize(
    ("rows", "n_dim", "k_dim", "dtype", "bias"),
    [
        (1, 37, 100, F32, False),
        (2, 64, 256, BF16, True),
        (3, 2050, 48, F16, False),  # wide: 8 columns per program, a ragged last program
        (4, 9, 600, BF16, False),  # K over several tiles with a ragged tail
        (0, 16, 32, BF16, True),
    ],
)
def test_skinny_linear_matches_reference(
    kernels: ModuleType, rows: int, n_dim: int, k_dim: int, dtype: torch.dtype, bias: bool
) -> None:
    """One rounding of a float32 sum: |err| <= u |ref| + 1e-5 * sum_k |x_k w_k| (+ 1e-5)."""
    gen = _gen(rows + n_dim)
    x = _rows(gen, rows, k_dim, dtype)
    w = _randn(gen, n_dim, k_dim, dtype=dtype)
    b = _randn(gen, n_dim, dtype=dtype) if bias else None
    out = kernels.skinny_linear(x, w, b)
    assert out.shape == (rows, n_dim) and out.dtype == dtype
    ref = x.float() @ w.float().T + (b.float() if b is not None else 0.0)
    magnitude = x.float().abs() @ w.float().abs().T
    if rows == 0:
        return
    _within(out, ref, UNIT_ROUNDOFF[dtype] * ref.abs() + 1e-5 * magnitude)


def test_skinny_linear_is_what_small_batches_of_linear_use(kernels: ModuleType) -> None:
    from kubellm.engine.layers import Linear

    gen = _gen(5)
    layer = Linear(40, 24, bias=True).to(DEVICE)
    layer.weight.copy_(_randn(gen, 24, 40))
    assert layer.bias is not None
    layer.bias.copy_(_randn(gen, 24))
    calls = []
    layer.kernels = kernels
    original = kernels.skinny_linear

    def spy(*args: torch.Tensor | None) -> torch.Tensor:
        calls.append(args[0].shape[0])  # type: ignore[union-attr]
        return original(*args)

    try:
        kernels.skinny_linear = spy
        for rows in (1, kernels.SKINNY_MAX_ROWS, kernels.SKINNY_MAX_ROWS + 1):
            x = _randn(gen, rows, 40)
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
            _close(layer(x), expected, F32)
    finally:
        kernels.skinny_linear = original
    assert calls == [1, kernels.SKINNY_MAX_ROWS]


def test_skinny_linear_refuses_bad_input(kernels: ModuleType) -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at most 4 rows"):
        kernels.skinny_linear(torch.zeros(5, 8, device=DEVICE), torch.zeros(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must be \[N, 8\]"):
        kernels.skinny_linear(x, torch.zeros(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight is torch\.bfloat16"):
        kernels.skinny_linear(x, torch.zeros(3, 8, device=DEVICE, dtype=BF16))
    with pytest.raises(ValueError, match="bias must be"):
        kernels.skinny_linear(x, torch.zeros(3, 8, device=DEVICE), torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize(
    ("inter", "k_dim", "dtype"), [(5, 48, F32), (37, 300, BF16), (64, 64, F16)]
)
def test_skinny_gate_up_silu_is_the_two_kernels_in_one(
    kernels: ModuleType, inter: int, k_dim: int, dtype: torch.dtype
) -> None:
    """Gate and up are rounded to the dtype before SiLU-mul, as with the unfused kernels, so
    the one launch agrees with `silu_and_mul(skinny_linear(x, w))` to one rounding."""
    gen = _gen(inter)
    x = _rows(gen, 1, k_dim, dtype)
    w = _randn(gen, 2 * inter, k_dim, dtype=dtype)
    fused = kernels.skinny_gate_up_silu(x, w)
    assert fused.shape == (1, inter) and fused.dtype == dtype
    two = kernels.silu_and_mul(kernels.skinny_linear(x, w))
    _within(fused, two, UNIT_ROUNDOFF[dtype] * two.float().abs())
    ref = reference_silu_and_mul((x.float() @ w.float().T).to(dtype))
    _within(fused, ref, 3 * UNIT_ROUNDOFF[dtype] * ref.abs() + 1e-4)


def test_skinny_gate_up_silu_refuses_bad_input(kernels: ModuleType) -> None:
    x = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="exactly one row"):
        kernels.skinny_gate_up_silu(
            torch.zeros(2, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)
        )
    with pytest.raises(ValueError, match="even row count"):
        kernels.skinny_gate_up_silu(x, torch.zeros(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must be \[2I, 8\]"):
        kernels.skinny_gate_up_silu(x, torch.zeros(4, 7, device=DEVICE))

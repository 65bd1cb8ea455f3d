"""The Triton varlen paged prefill kernel against its float32 torch reference and the torch path.

Without CUDA the kernel runs on CPU tensors under Triton's interpreter (tests/engine/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); with CUDA the same tests run it compiled:
    python3 -m pytest -c /dev/null --rootdir . -p no:cacheprovider -q \
        tests/engine/test_prefill_kernel.py

Inputs are poisoned like paged_inputs.py's: every cache slot outside a context is NaN, and
block-table entries past a context point at a NaN block, so reading anything it should not makes
the kernel return NaN.

Error bounds asserted (kernel vs the float32 reference on the same inputs; |err| <= atol + rtol *
|ref|):
- float32: 1e-5 abs + 1e-5 rel (IEEE dots, exp2-based online softmax);
- bfloat16: 2e-2 abs + 1e-2 rel (probabilities before the P.V dot and the output are rounded to
  bf16, relative error 2^-9 each, on outputs of magnitude <= ~4);
- float16: 5e-3 abs + 2e-3 rel (the same roundings at 2^-12).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from kernel_modules import triton_module  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.attention import PagedAttention, SeqChunk, build_attention_metadata
from kubellm.engine.kernels.reference import reference_prefill_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3),
}
HEAD_DIM = 32
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (cached tokens, new tokens) per chunk: fresh prompts of odd, block-boundary and 1-token lengths,
# prefix-cache hits (16 and 33 cached, then 5 new), a chunk with nothing to do, a later part of
# a chunked prefill.
MIXED = [(0, 37), (16, 5), (33, 5), (0, 1), (5, 0), (0, 16), (20, 40), (47, 1)]


@dataclass(frozen=True)
class PrefillCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_query_lens: torch.Tensor
    context_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    scale: float

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.q, self.k_cache, self.v_cache, self.cu_query_lens, self.context_lens)


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The prefill kernel module, interpreted on CPU (fails loudly if that cannot work)."""
    return triton_module("triton_prefill")


def make_prefill_case(
    chunks: list[tuple[int, int]],
    heads: tuple[int, int],
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    head_dim: int = HEAD_DIM,
) -> PrefillCase:
    """Random caches holding each context at shuffled blocks, everything else NaN."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    num_heads, num_kv_heads = heads
    contexts = [cached + new for cached, new in chunks]
    needed = [-(-n // block_size) for n in contexts]
    num_blocks = sum(needed) + 1  # the last block is never part of a context
    poison = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen, device=DEVICE).to(torch.int32)
    table = torch.full((len(chunks), max(needed) + 2), poison, dtype=torch.int32, device=DEVICE)
    valid = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    start = 0
    for s, (n, k) in enumerate(zip(contexts, needed, strict=True)):
        table[s, :k] = perm[start : start + k]
        start += k
        slots = table[s, :k].long().repeat_interleave(block_size) * block_size
        valid[slots[:n] + torch.arange(n, device=DEVICE) % block_size] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
        cache.view(num_blocks * block_size, -1)[~valid] = float("nan")
        caches.append(cache)
    new = [n for _, n in chunks]
    # q as a strided view of a wider projection, like the model's qkv split.
    packed = torch.randn(sum(new), num_heads + 1, head_dim, generator=gen, device=DEVICE)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return PrefillCase(
        q=packed.to(dtype)[:, 1:],
        k_cache=caches[0],
        v_cache=caches[1],
        cu_query_lens=cu.to(DEVICE),
        context_lens=torch.tensor(contexts, dtype=torch.int32, device=DEVICE),
        block_table=table,
        max_query_len=max(new),
        scale=head_dim**-0.5,
    )


def _check(
    kernels: ModuleType,
    chunks: list[tuple[int, int]],
    heads: tuple[int, int],
    block_size: int,
    dtype: torch.dtype,
    config: tuple[int, int] | None = None,
    head_dim: int = HEAD_DIM,
) -> None:
    case = make_prefill_case(chunks, heads, block_size, dtype, block_size + heads[0], head_dim)
    cfg = None if config is None else kernels.PrefillConfig(*config)
    out = kernels.paged_prefill_attention(
        *case.args(), case.block_table, case.max_query_len, case.scale, config=cfg
    )
    ref = reference_prefill_attention(*case.args(), case.block_table, case.scale)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert not ref.isnan().any()
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("heads", "block_size", "config"),
    [
        ((2, 2), 16, None),  # the default tiles
        ((4, 2), 16, (16, 16)),  # small tiles: several query tiles, unmasked + diagonal tiles
        ((8, 2), 8, (32, 16)),  # GQA 4; a K/V tile spans two cache blocks
        ((6, 2), 32, (16, 16)),  # GQA 3 (padded to 4); a cache block spans two K/V tiles
    ],
)
def test_prefill_matches_reference_fp32(
    kernels: ModuleType,
    heads: tuple[int, int],
    block_size: int,
    config: tuple[int, int] | None,
) -> None:
    _check(kernels, MIXED, heads, block_size, torch.float32, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_matches_reference_half(kernels: ModuleType, dtype: torch.dtype) -> None:
    _check(kernels, MIXED, (4, 2), 16, dtype, (16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_head_dim_not_a_power_of_two(kernels: ModuleType, dtype: torch.dtype) -> None:
    """head_dim 24 (the tests' tiny checkpoints) is padded to 32 inside the kernel."""
    _check(kernels, MIXED, (4, 2), 16, dtype, (16, 16), head_dim=24)


def test_prefill_block_size_one_and_single_token_chunks(kernels: ModuleType) -> None:
    _check(kernels, [(0, 1), (3, 1), (0, 2), (9, 4)], (2, 1), 1, torch.float32, (16, 16))


def test_prefill_without_tokens_returns_empty(kernels: ModuleType) -> None:
    case = make_prefill_case([(4, 0), (0, 0)], (2, 2), 16, torch.float32)
    out = kernels.paged_prefill_attention(*case.args(), case.block_table, 0, case.scale)
    assert out.shape == (0, 2, HEAD_DIM)


@pytest.mark.slow
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_matches_reference_grid(
    kernels: ModuleType, heads: tuple[int, int], block_size: int, dtype: torch.dtype
) -> None:
    """GQA 1, 2, 4 and 8 at every dtype: small tiles for float32, the defaults otherwise."""
    chunks = [(0, 70), (29, 31), (64, 1), (0, 3), (0, 0), (95, 5)]
    _check(kernels, chunks, heads, block_size, dtype, (32, 16) if dtype == torch.float32 else None)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="real shapes are too slow for the interpreter")
@pytest.mark.parametrize(
    ("head_dim", "dtype"),
    [
        (128, torch.bfloat16),
        (128, torch.float32),
        (64, torch.float16),
        (256, torch.bfloat16),
        (256, torch.float32),
    ],
)
def test_prefill_compiled_real_shapes(
    kernels: ModuleType, head_dim: int, dtype: torch.dtype
) -> None:
    """Qwen3-0.6B's heads (16 q, 8 KV) and the workload's prompt lengths, default tiles."""
    chunks = [(0, 1024), (0, 100), (512, 397), (0, 1), (1000, 24), (0, 643), (48, 977)]
    _check(kernels, chunks, (16, 8), 16, dtype, None, head_dim)


def test_prefill_matches_torch_paged_attention(kernels: ModuleType) -> None:
    """The kernel and PagedAttention's torch path (per-chunk SDPA, gathers for cached
    contexts) agree on one step of prefills, with and without cached context."""
    bs, hq, hk = 16, 4, 2
    chunks = [SeqChunk(0, 21, [5, 7]), SeqChunk(16, 5, [0, 3]), SeqChunk(33, 7, [6, 1, 4, 2])]
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    attn = PagedAttention(hq, hk, HEAD_DIM)
    shape = (9, bs, hk, HEAD_DIM)
    attn.k_cache = torch.randn(shape, generator=gen, device=DEVICE)
    attn.v_cache = torch.randn(shape, generator=gen, device=DEVICE)
    total = sum(c.num_new for c in chunks)
    q, k, v = (torch.randn(total, h, HEAD_DIM, generator=gen, device=DEVICE) for h in (hq, hk, hk))
    meta = build_attention_metadata(chunks, bs, DEVICE)
    expected = attn(q, k, v, meta).view(total, hq, HEAD_DIM)  # also stores the new K/V
    table = torch.tensor([c.block_ids + [0] * (4 - len(c.block_ids)) for c in chunks])
    new = torch.tensor([c.num_new for c in chunks])
    out = kernels.paged_prefill_attention(
        q,
        attn.k_cache,
        attn.v_cache,
        torch.cat([torch.zeros(1), new.cumsum(0)]).to(DEVICE, torch.int32),
        torch.tensor([c.num_computed + c.num_new for c in chunks]).to(DEVICE, torch.int32),
        table.to(DEVICE, torch.int32),
        int(new.max()),
        HEAD_DIM**-0.5,
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefill_refuses_bad_input(kernels: ModuleType) -> None:
    case = make_prefill_case([(3, 4), (0, 2)], (4, 2), 16, torch.float32)
    q, k_cache, v_cache, cu, ctx = case.args()
    table, run = case.block_table, kernels.paged_prefill_attention
    with pytest.raises(ValueError, match="int32"):
        run(q, k_cache, v_cache, cu, ctx, table.long(), 4, 1.0)
    with pytest.raises(ValueError, match="cu_query_lens must be int32"):
        run(q, k_cache, v_cache, cu.long(), ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        run(q[:, :3], k_cache, v_cache, cu, ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match=r"q is torch\.bfloat16"):
        run(q.bfloat16(), k_cache, v_cache, cu, ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match=r"cu_query_lens must be a contiguous \[3\]"):
        run(q, k_cache, v_cache, cu[:2], ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match="block_table must be"):
        run(q, k_cache, v_cache, cu, ctx, table[:1], 4, 1.0)
    with pytest.raises(ValueError, match="cannot hold 6 query tokens"):
        run(q, k_cache, v_cache, cu, ctx, table, 2, 1.0)
    with pytest.raises(ValueError, match="max_query_len must be an int"):
        run(q, k_cache, v_cache, cu, ctx, table, torch.tensor(4), 1.0)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\]"):
        wide = torch.zeros(*k_cache.shape[:3], 288, dtype=k_cache.dtype, device=DEVICE)
        run(torch.zeros(*q.shape[:2], 288, device=DEVICE), wide, wide, cu, ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match="block size must be a power of two"):
        run(q, k_cache[:, :12], v_cache[:, :12], cu, ctx, table, 4, 1.0)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        run(q, k_cache, v_cache, cu, ctx, table, 4, 1.0, config=kernels.PrefillConfig(16, 24))
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="one device"):
            run(q, k_cache, v_cache, cu.cpu(), ctx, table, 4, 1.0)

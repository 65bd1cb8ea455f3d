"""Triton paged kernels against their float32 torch references, and the backend wire-up.

Without CUDA the kernels run on CPU tensors under Triton's interpreter: tests/engine/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported (triton reads it at import time; setting
it later leaves triton's own library functions compiled and the kernels fail). With CUDA the same
tests run the compiled kernels on the GPU.

Error bounds asserted (kernel vs float32 reference on the same inputs):
- float32 inputs: 1e-5 abs + 1e-5 rel (exp2-based online softmax, split-K reduce);
- bfloat16 / float16 inputs: 2e-2 / 1e-2 abs (probabilities and the output are rounded to the
  input dtype, relative error 2^-8 / 2^-11, on outputs of magnitude <= ~4).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import paged_inputs as pi  # type: ignore[import-not-found, unused-ignore]
import pytest
import torch
from kernel_modules import triton_module  # type: ignore[import-not-found, unused-ignore]

from kubellm.engine.attention import PagedAttention, SeqChunk, build_attention_metadata
from kubellm.engine.config import ModelConfig
from kubellm.engine.kernels.choice import resolve_attention_backend
from kubellm.engine.kernels.reference import reference_decode_attention, reference_store_kv
from kubellm.engine.model_runner import ModelRunner
from kubellm.protocol.settings import EngineSettings

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 0.0),
    torch.float16: (1e-2, 0.0),
}
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The Triton kernel module, interpreted on CPU (fails loudly if that cannot work)."""
    return triton_module("triton_paged")


def _check_decode(
    kernels: ModuleType,
    lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    partition: int | None,
) -> None:
    case = pi.make_decode_case(lens, *heads, head_dim, block_size, dtype, DEVICE, seed=len(lens))
    args = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.scale)
    out = kernels.paged_decode_attention(*args, partition_size=partition)
    ref = reference_decode_attention(*args)
    assert out.dtype == dtype and out.shape == case.q.shape
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


# ---- decode attention ------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "block_size", "partition"),
    [
        (1, (4, 4), 64, 16, 16),
        (3, (8, 2), 64, 32, 32),
        (7, (16, 8), 128, 16, 32),
        (7, (8, 2), 128, 32, 64),
    ],
)
def test_decode_matches_reference_fp32(
    kernels: ModuleType,
    batch: int,
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    partition: int,
) -> None:
    lens = pi.context_lengths(batch, block_size, partition, offset=batch)
    _check_decode(kernels, lens, heads, head_dim, block_size, torch.float32, partition)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference_half(kernels: ModuleType, dtype: torch.dtype) -> None:
    lens = pi.context_lengths(5, 16, 16)
    _check_decode(kernels, lens, (8, 2), 64, 16, dtype, 16)


@needs_triton
@pytest.mark.parametrize("lens", [[1], [16], [15, 17], [0, 33], [70, 1, 0]])
def test_decode_edge_lengths(kernels: ModuleType, lens: list[int]) -> None:
    """One token, exactly one block, a boundary +-1, empty rows (CUDA-graph padding) -> zeros."""
    _check_decode(kernels, lens, (4, 2), 64, 16, torch.float32, 16)


@needs_triton
def test_decode_default_partition_single_and_split(kernels: ModuleType) -> None:
    """The automatic partition size, with one partition (no reduce) and with several."""
    assert kernels.choose_partition_size(256, 8, 2048) == 2048
    assert kernels.choose_partition_size(64, 8, 2048) == 1024
    assert kernels.choose_partition_size(1, 8, 2048) == 64
    _check_decode(kernels, [5, 40], (4, 2), 64, 16, torch.float32, None)
    _check_decode(kernels, [130], (4, 2), 64, 16, torch.float32, None)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (16, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference_grid(
    kernels: ModuleType, batch: int, heads: tuple[int, int], head_dim: int, block_size: int
) -> None:
    lens = pi.context_lengths(batch, block_size, 32, offset=head_dim // 64 + block_size // 16)
    _check_decode(kernels, lens, heads, head_dim, block_size, torch.float32, 32)
    _check_decode(kernels, lens, heads, head_dim, block_size, torch.bfloat16, 32)


@needs_triton
def test_decode_refuses_bad_input(kernels: ModuleType) -> None:
    case = pi.make_decode_case([3], 4, 2, 64, 16, torch.float32, DEVICE)
    args = (case.q, case.k_cache, case.v_cache)
    with pytest.raises(ValueError, match="int32"):
        kernels.paged_decode_attention(*args, case.block_table.long(), case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        kernels.paged_decode_attention(
            case.q[:, :3], *args[1:], case.block_table, case.seq_lens, 1.0
        )
    with pytest.raises(ValueError, match="power of two"):
        kernels.paged_decode_attention(
            *args, case.block_table, case.seq_lens, 1.0, partition_size=24
        )


# ---- storing K/V -----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(2, 64, 16), (8, 128, 32)])
def test_store_kv_matches_reference(
    kernels: ModuleType, dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    num_blocks, tokens = 6, 9
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    # K and V as strided views of one packed projection, like the model's qkv split.
    packed = torch.randn(tokens, 3, num_kv_heads, head_dim, generator=gen, device=DEVICE)
    key, value = packed[:, 0].to(dtype), packed[:, 2]
    value = value.to(dtype) if dtype != torch.float32 else value
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:tokens]
    slots[[1, 5]] = -1  # padding rows are skipped
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kernels.store_kv(key, value, k_cache, v_cache, slots)
    reference_store_kv(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[written], key[slots >= 0])


@needs_triton
def test_store_kv_refuses_bad_input(kernels: ModuleType) -> None:
    cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    kv = torch.zeros(3, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="key/value must be"):
        kernels.store_kv(kv[:, :1], kv[:, :1], cache, cache.clone(), torch.zeros(3).long())
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.store_kv(kv, kv, cache, cache.clone(), torch.zeros(3, device=DEVICE))


# ---- wire-up: PagedAttention backends ---------------------------------------------------------


def _paged_layer(backend: str, hq: int, hk: int, d: int, bs: int, blocks: int) -> PagedAttention:
    attn = PagedAttention(hq, hk, d)
    attn.k_cache = torch.zeros(blocks, bs, hk, d, device=DEVICE)
    attn.v_cache = torch.zeros(blocks, bs, hk, d, device=DEVICE)
    attn.set_backend(backend)
    return attn


def _run_layer(
    attn: PagedAttention, chunks: list[SeqChunk], bs: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill each context's earlier tokens, run the step's tokens; (output, metadata's q)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    hk, d = attn.num_kv_heads, attn.head_dim
    for c in chunks:
        for p in range(c.num_computed):
            for cache in (attn.k_cache, attn.v_cache):
                cache[c.block_ids[p // bs], p % bs] = torch.randn(
                    hk, d, generator=gen, device=DEVICE
                )
    total = sum(c.num_new for c in chunks)
    q = torch.randn(total, attn.num_heads, d, generator=gen, device=DEVICE)
    k = torch.randn(total, hk, d, generator=gen, device=DEVICE)
    v = torch.randn(total, hk, d, generator=gen, device=DEVICE)
    meta = build_attention_metadata(chunks, bs, DEVICE, backend=attn.backend)
    return attn(q, k, v, meta), q


def test_torch_decode_path_agrees_with_reference() -> None:
    """The engine's SDPA decode path and the kernels' reference compute the same thing."""
    bs = 16
    chunks = [SeqChunk(0, 1, [4]), SeqChunk(16, 1, [0, 2]), SeqChunk(40, 1, [1, 3, 5])]
    attn = _paged_layer("torch", 8, 2, 64, bs, 8)
    out, q = _run_layer(attn, chunks, bs, seed=1)
    meta = build_attention_metadata(chunks, bs, DEVICE)
    assert meta.decode is not None
    assert meta.decode.block_table.dtype == torch.int32
    assert meta.decode.seq_lens.tolist() == [1, 17, 41]
    ref = reference_decode_attention(
        q, attn.k_cache, attn.v_cache, meta.decode.block_table, meta.decode.seq_lens, 64**-0.5
    )
    torch.testing.assert_close(out.view_as(ref), ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_backend_matches_torch_backend(kernels: ModuleType) -> None:
    """A mixed step (prefills with and without cached context, decodes) through both backends."""
    bs = 16
    chunks = [
        SeqChunk(0, 5, [6]),
        SeqChunk(20, 1, [0, 2]),
        SeqChunk(16, 3, [1, 3]),
        SeqChunk(0, 1, [7]),
        SeqChunk(47, 1, [4, 5, 8]),
    ]
    outs = []
    for backend in ("torch", "triton"):
        attn = _paged_layer(backend, 4, 2, 64, bs, 9)
        out, _ = _run_layer(attn, chunks, bs, seed=2)
        outs.append((out, attn.k_cache, attn.v_cache))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[1][1], outs[0][1]) and torch.equal(outs[1][2], outs[0][2])


# ---- choosing the backend ----------------------------------------------------------------------


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "torch"
    assert resolve_attention_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="--attention-backend triton needs a CUDA device"):
        resolve_attention_backend("triton", cpu)
    assert EngineSettings().attention_backend == "auto"


def test_triton_backend_on_cpu_fails_at_start_up() -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    config = ModelConfig.from_dicts("unused", cfg, {})
    settings = EngineSettings(device="cpu", attention_backend="triton", num_kv_blocks=4)
    with pytest.raises(ValueError, match="--attention-backend triton needs a CUDA device"):
        ModelRunner(config, settings)

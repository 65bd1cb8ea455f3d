"""The Triton paged kernels compiled on a GPU, at Qwen3-0.6B shapes, and a whole generation.

Skipped without CUDA. Run on a GPU machine with:
    python -m pytest -q tests/engine/test_kernels_cuda.py

Error bounds (kernel vs the float32 reference on the same inputs): bfloat16 2e-2 abs, float32
1e-5 abs + 1e-5 rel (float32 dots run with input_precision="ieee", not TF32).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import paged_inputs as pi  # type: ignore[import-not-found, unused-ignore]
import pytest
import torch

from kubellm.engine.kernels.reference import reference_decode_attention, reference_store_kv

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and triton",
)

CUDA = torch.device("cuda")
HQ, HK, D, BS = 16, 8, 128, 16  # Qwen3-0.6B attention
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 0.0)}  # (atol, rtol)


def _compiled_kernels() -> object:
    import triton

    from kubellm.engine.kernels import triton_paged

    assert not triton.knobs.runtime.interpret, "TRITON_INTERPRET is set: kernels not compiled"
    return triton_paged


def _lengths(batch: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    edges = [1, BS, BS + 1, max_len]  # one token, one block, a boundary, the longest
    return [*edges[:batch], *lens[len(edges) :]]


@pytest.mark.parametrize(
    ("batch", "max_len", "dtype", "partition"),
    [
        (1, 128, torch.bfloat16, None),
        (1, 2048, torch.bfloat16, None),
        (7, 1000, torch.float32, None),
        (64, 2048, torch.bfloat16, 512),
        (256, 1024, torch.bfloat16, None),
        (256, 2048, torch.bfloat16, None),
        (256, 2048, torch.float32, 256),
    ],
)
def test_decode_compiled_matches_reference(
    batch: int, max_len: int, dtype: torch.dtype, partition: int | None
) -> None:
    kernels = _compiled_kernels()
    case = pi.make_decode_case(_lengths(batch, max_len, batch), HQ, HK, D, BS, dtype, CUDA)
    args = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.scale)
    out = kernels.paged_decode_attention(*args, partition_size=partition)  # type: ignore[attr-defined]
    ref = reference_decode_attention(*args)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_compiled_matches_reference(dtype: torch.dtype) -> None:
    kernels = _compiled_kernels()
    gen = torch.Generator(device=CUDA).manual_seed(0)
    num_blocks, tokens = 4096, 8192
    k_cache = torch.randn(num_blocks, BS, HK, D, generator=gen, device=CUDA).to(dtype)
    v_cache = torch.randn(num_blocks, BS, HK, D, generator=gen, device=CUDA).to(dtype)
    packed = torch.randn(tokens, HQ + 2 * HK, D, generator=gen, device=CUDA).to(dtype)
    key, value = packed[:, HQ : HQ + HK], packed[:, HQ + HK :]  # strided, like the qkv split
    slots = torch.randperm(num_blocks * BS, generator=gen, device=CUDA)[:tokens]
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kernels.store_kv(key, value, k_cache, v_cache, slots)  # type: ignore[attr-defined]
    reference_store_kv(key, value, k_ref, v_ref, slots)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("kind", ["qwen3", "llama_tied_llama3"])
def test_greedy_generation_torch_vs_triton(tiny_dirs: dict[str, Path], kind: str) -> None:
    """A whole greedy generation (prefills, chunked prefill, decodes) gives the same tokens."""
    from kubellm.engine.llm import LLM
    from kubellm.protocol.messages import SamplingParams

    prompts = [[1, *range(3, 3 + n)] for n in (5, 17, 40, 90)]
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(tiny_dirs[kind]),
            device="cuda",
            dtype="float32",
            attention_backend=backend,
            num_kv_blocks=256,
            block_size=BS,
            max_num_batched_tokens=64,
            max_model_len=256,
        )
        assert llm.engine.executor.attention_backend == backend  # type: ignore[attr-defined]
        tokens[backend] = [r.token_ids for r in llm.generate(prompts, greedy)]
    assert all(len(t) == 48 for t in tokens["torch"])
    assert tokens["triton"] == tokens["torch"]


def test_decode_replays_in_cuda_graph() -> None:
    """No host sync or data-dependent launch: a captured call follows new q and seq_lens."""
    kernels = _compiled_kernels()
    lens = [1, 17, 300, 1024, 513, 64, 2, 999]
    case = pi.make_decode_case(lens, HQ, HK, D, BS, torch.bfloat16, CUDA)
    args = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.paged_decode_attention(*args)  # type: ignore[attr-defined]  # compile first
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_decode_attention(*args)  # type: ignore[attr-defined]
    case.q.copy_(torch.randn_like(case.q))
    case.seq_lens.copy_(torch.tensor([0, 16, 299, 700, 512, 1, 2, 998], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out.float(), reference_decode_attention(*args), atol=atol, rtol=rtol)

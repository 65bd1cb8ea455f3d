"""Decode CUDA graphs: bucket choice and static-input filling on the CPU; replays on a GPU.

The CUDA tests are skipped without CUDA and triton. Run them on a GPU machine with:
    python -m pytest -q tests/engine/test_cuda_graphs.py
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch

from kubellm.engine.attention import PagedAttention, SeqChunk, build_attention_metadata
from kubellm.engine.cuda_graphs import (
    BATCH_BUCKETS,
    DecodeGraphs,
    HostInputs,
    fill_static_inputs,
    graph_batch_sizes,
    pick_bucket,
)
from kubellm.engine.llm import LLM
from kubellm.engine.model_runner import ModelRunner, _FlatInputs

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and triton",
)
BS = 16
GARBAGE = 77


@pytest.mark.parametrize(
    ("max_num_seqs", "expected"),
    [
        (1, (1,)),
        (6, (1, 2, 4, 6)),
        (64, (1, 2, 4, 8, 16, 24, 32, 48, 64)),
        (100, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)),
        (1000, BATCH_BUCKETS),
    ],
)
def test_graph_batch_sizes_are_capped(max_num_seqs: int, expected: tuple[int, ...]) -> None:
    assert graph_batch_sizes(max_num_seqs) == expected


def test_graph_batch_sizes_rejects_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        graph_batch_sizes(0)


@pytest.mark.parametrize("max_num_seqs", [6, 100, 256, 512])
def test_pick_bucket_is_the_smallest_that_fits(max_num_seqs: int) -> None:
    sizes = graph_batch_sizes(max_num_seqs)
    for batch in range(1, 300):
        fits = [s for s in sizes if s >= batch]
        assert pick_bucket(sizes, batch) == (min(fits) if fits else None)
    with pytest.raises(ValueError, match="at least one row"):
        pick_bucket(sizes, 0)


def _host_buffers(max_bs: int, max_blocks: int) -> HostInputs:
    """Buffers full of garbage, so every value the fill leaves behind is visible."""
    return HostInputs(
        input_ids=np.full(max_bs, GARBAGE, dtype=np.int64),
        positions=np.full(max_bs, GARBAGE, dtype=np.int64),
        slot_mapping=np.full(max_bs, GARBAGE, dtype=np.int64),
        seq_lens=np.full(max_bs, GARBAGE, dtype=np.int32),
        block_table=np.full((max_bs, max_blocks), GARBAGE, dtype=np.int32),
    )


def _decode_rows(
    n: int, max_blocks: int, seed: int
) -> tuple[list[int], list[int], list[list[int]]]:
    """n rows with contexts from 1 token to a full table, some with spare allocated blocks."""
    rng = random.Random(seed)
    ids, positions, blocks = [], [], []
    edge_positions = [0, BS - 1, BS, max_blocks * BS - 1]
    for i in range(n):
        pos = edge_positions[i] if i < len(edge_positions) else rng.randrange(max_blocks * BS)
        need = pos // BS + 1
        extra = rng.randrange(max_blocks - need + 1)
        ids.append(rng.randrange(3, 300))
        positions.append(pos)
        blocks.append(rng.sample(range(1000), need + extra))
    return ids, positions, blocks


def _check_filled(
    bufs: HostInputs, ids: list[int], positions: list[int], blocks: list[list[int]], bucket: int
) -> None:
    n = len(ids)
    for i, (pos, row_blocks) in enumerate(zip(positions, blocks, strict=True)):
        need = pos // BS + 1
        assert bufs.block_table[i, :need].tolist() == row_blocks[:need]
        assert bufs.slot_mapping[i] == row_blocks[pos // BS] * BS + pos % BS
        assert bufs.seq_lens[i] == pos + 1
    assert bufs.input_ids[:n].tolist() == ids
    assert bufs.positions[:n].tolist() == positions
    assert (bufs.slot_mapping[n:bucket] == -1).all()
    assert (bufs.seq_lens[n:bucket] == 0).all()
    assert (bufs.input_ids[n:bucket] == 0).all() and (bufs.positions[n:bucket] == 0).all()
    assert (bufs.block_table[n:bucket] == 0).all()


def test_fill_static_inputs_rows_and_padding() -> None:
    max_blocks = 6
    bufs = _host_buffers(16, max_blocks)
    ids, positions, blocks = _decode_rows(7, max_blocks, seed=0)
    fill_static_inputs(bufs, ids, positions, blocks, 8, BS)
    _check_filled(bufs, ids, positions, blocks, 8)
    assert (bufs.input_ids[8:] == GARBAGE).all(), "rows past the bucket are not touched"
    # The batch shrinks: rows that held sequences before become padding.
    fill_static_inputs(bufs, ids[:3], positions[:3], blocks[:3], 4, BS)
    _check_filled(bufs, ids[:3], positions[:3], blocks[:3], 4)


def test_fill_static_inputs_agrees_with_the_eager_metadata() -> None:
    max_blocks = 5
    bufs = _host_buffers(32, max_blocks)
    ids, positions, blocks = _decode_rows(24, max_blocks, seed=1)
    fill_static_inputs(bufs, ids, positions, blocks, 24, BS)
    chunks = [SeqChunk(p, 1, b) for p, b in zip(positions, blocks, strict=True)]
    meta = build_attention_metadata(chunks, BS, torch.device("cpu"))
    assert meta.decode is not None
    assert bufs.slot_mapping[:24].tolist() == meta.slot_mapping.tolist()
    assert bufs.seq_lens[:24].tolist() == meta.decode.seq_lens.tolist()
    width = meta.decode.block_table.shape[1]
    for i, pos in enumerate(positions):
        need = pos // BS + 1
        assert bufs.block_table[i, :need].tolist() == meta.decode.block_table[i, :need].tolist()
        assert need <= width


def test_fill_static_inputs_rejects_bad_rows() -> None:
    bufs = _host_buffers(4, 3)
    with pytest.raises(ValueError, match="needs 2 KV blocks"):
        fill_static_inputs(bufs, [5], [BS], [[7]], 1, BS)
    with pytest.raises(ValueError, match="at most 3"):
        fill_static_inputs(bufs, [5], [3 * BS], [[1, 2, 3, 4]], 1, BS)
    with pytest.raises(ValueError, match="do not fit"):
        fill_static_inputs(bufs, [5, 6, 7], [0, 0, 0], [[1], [2], [3]], 2, BS)
    with pytest.raises(ValueError, match="one entry per row"):
        fill_static_inputs(bufs, [5, 6], [0], [[1], [2]], 2, BS)


def _naive_slots(chunks: list[SeqChunk]) -> list[int]:
    return [
        c.block_ids[p // BS] * BS + p % BS
        for c in chunks
        for p in range(c.num_computed, c.num_computed + c.num_new)
    ]


def test_slot_mapping_matches_the_per_token_formula() -> None:
    rng = random.Random(2)
    chunks = []
    for _ in range(40):
        start = rng.choice([0, rng.randrange(200), BS, 2 * BS - 1])
        new = rng.choice([1, 1, rng.randrange(1, 90), BS, BS + 1])
        need = (start + new + BS - 1) // BS
        chunks.append(SeqChunk(start, new, rng.sample(range(5000), need + rng.randrange(3))))
    meta = build_attention_metadata(chunks, BS, torch.device("cpu"))
    assert meta.slot_mapping.tolist() == _naive_slots(chunks)


def test_triton_metadata_has_no_mask_and_one_varlen_batch_for_mixed_steps() -> None:
    decodes = [SeqChunk(5, 1, [3]), SeqChunk(20, 1, [4, 9])]
    mixed = [*decodes, SeqChunk(0, 3, [1])]
    cpu = torch.device("cpu")
    with_mask = build_attention_metadata(decodes, BS, cpu)
    without = build_attention_metadata(decodes, BS, cpu, backend="triton")
    assert with_mask.decode is not None and without.decode is not None
    assert with_mask.decode.mask is not None and without.decode.mask is None
    assert torch.equal(with_mask.slot_mapping, without.slot_mapping)
    assert torch.equal(with_mask.decode.block_table, without.decode.block_table)
    assert torch.equal(with_mask.decode.seq_lens, without.decode.seq_lens)
    assert without.varlen is None and not without.prefills
    attn = PagedAttention(2, 1, 8)
    attn.k_cache = torch.zeros(16, BS, 1, 8)
    attn.v_cache = torch.zeros(16, BS, 1, 8)
    q, kv = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    attn(q, kv, kv, with_mask)
    with pytest.raises(ValueError, match=r"needs DecodeBatch\.mask"):
        attn(q, kv, kv, without)
    # A step with a prefill chunk: every chunk, one-token ones included, in one varlen batch.
    meta = build_attention_metadata(mixed, BS, cpu, backend="triton")
    assert meta.decode is None and not meta.prefills and meta.varlen is not None
    assert meta.varlen.cu_query_lens.tolist() == [0, 1, 2, 5]
    assert meta.varlen.context_lens.tolist() == [6, 21, 3]
    assert meta.varlen.block_table.tolist() == [[3, 0], [4, 9], [1, 0]]
    assert meta.varlen.max_query_len == 3
    assert meta.varlen.block_table.dtype == torch.int32


def test_cpu_runner_builds_no_graphs(tiny_dirs: dict[str, Path]) -> None:

    llm = LLM(str(tiny_dirs["qwen3"]), device="cpu", num_kv_blocks=32, max_model_len=128)
    assert _runner(llm).decode_graphs is None


class _EagerReplay:
    """Stands in for a captured graph on the CPU: recomputes the bucket into its output."""

    def __init__(self, graphs: DecodeGraphs, bucket: int) -> None:
        self.graphs, self.bucket = graphs, bucket

    def replay(self) -> None:
        self.graphs.outputs[self.bucket].copy_(self.graphs._forward(self.bucket))


def _runner(llm: LLM) -> ModelRunner:
    return cast(ModelRunner, llm.engine.executor)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (conftest turns it on where there is no CUDA)",
)
def test_static_buffer_steps_match_eager_on_cpu(tiny_dirs: dict[str, Path]) -> None:
    """The graph path's inputs (static buffers, padding rows, no decode mask) through the Triton
    kernels in the interpreter: the same tokens as the eager path, as the batch shrinks."""
    from kubellm.protocol.messages import SamplingParams

    llm = LLM(str(tiny_dirs["qwen3"]), device="cpu", num_kv_blocks=64, max_model_len=256)
    runner = _runner(llm)
    for attn in runner.model.attention_layers():
        attn.set_backend("triton")
    runner.attention_backend = "triton"
    graphs = DecodeGraphs(runner.model, graph_batch_sizes(6), 16, BS, torch.device("cpu"))
    with torch.inference_mode():
        for bucket in graphs.sizes:
            graphs.outputs[bucket] = graphs._forward(bucket)
            graphs.graphs[bucket] = _EagerReplay(graphs, bucket)
    prompts = [tc.random_prompt(n, seed=i) for i, n in enumerate([3, 17, 40, 16, 90])]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (8, 3, 6, 7)]
    params.append(SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    eager = [r.token_ids for r in llm.generate(prompts, params)]
    runner.decode_graphs = graphs
    replayed = [r.token_ids for r in llm.generate(prompts, params)]
    assert graphs.replays >= 7  # one per decode step: batches of 5 down to 1
    assert replayed == eager


# ---- on a GPU -------------------------------------------------------------------------------


def _cuda_llm(model_dir: Path, eager: bool, async_scheduling: bool = True) -> LLM:

    llm = LLM(
        str(model_dir),
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        enforce_eager=eager,
        async_scheduling=async_scheduling,
        max_num_seqs=6,  # buckets 1, 2, 4, 6
        num_kv_blocks=128,
        block_size=BS,
        max_num_batched_tokens=64,
        max_model_len=256,
    )
    return llm


@needs_cuda
def test_greedy_generation_with_graphs_matches_eager(tiny_dirs: dict[str, Path]) -> None:
    """Five sequences (not a bucket) that finish at different steps, so the decode batch
    shrinks through several buckets; then a second round over reused, rewritten KV blocks."""
    from kubellm.protocol.messages import SamplingParams

    rounds = [
        ([3, 17, 40, 16, 90], [40, 12, 25, 33, 7]),
        ([70, 1, 33, 5, 18, 50], [9, 30, 21, 44, 2, 16]),
    ]
    llms = {eager: _cuda_llm(tiny_dirs["qwen3"], eager) for eager in (True, False)}
    graphs = _runner(llms[False]).decode_graphs
    assert graphs is not None and graphs.sizes == (1, 2, 4, 6)
    assert _runner(llms[True]).decode_graphs is None
    for r, (lengths, max_tokens) in enumerate(rounds):
        prompts = [tc.random_prompt(n, seed=10 * r + i) for i, n in enumerate(lengths)]
        params = [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens
        ]
        out = {
            eager: [res.token_ids for res in llm.generate(prompts, params)]
            for eager, llm in llms.items()
        }
        assert [len(t) for t in out[True]] == max_tokens
        assert out[False] == out[True], f"round {r}"
    assert graphs.replays > 0


@needs_cuda
def test_async_scheduling_on_cuda_gives_the_tokens_of_sync_steps(
    tiny_dirs: dict[str, Path],
) -> None:
    """Graph steps launched ahead read their input tokens from the previous step's samples on
    the GPU; greedy and seeded sampling give what synchronous steps give."""
    from kubellm.protocol.messages import SamplingParams

    prompts = [tc.random_prompt(n, seed=i) for i, n in enumerate([5, 30, 17, 2])]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (20, 9, 33, 14)
    ]
    params[1] = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    out = {}
    for async_on in (False, True):
        llm = _cuda_llm(tiny_dirs["qwen3"], eager=False, async_scheduling=async_on)
        out[async_on] = [r.token_ids for r in llm.generate(prompts, params)]
        assert (llm.engine.num_ahead_steps > 0) == async_on
        assert _runner(llm).decode_graphs is not None
    assert out[True] == out[False]
    assert [len(t) for t in out[True]] == [20, 12, 33, 14]


@needs_cuda
def test_replay_follows_new_kv_cache_contents(tiny_dirs: dict[str, Path]) -> None:
    """The graph reads the KV cache at replay time: rewrite it and replay again."""
    runner = _runner(_cuda_llm(tiny_dirs["qwen3"], eager=False))
    graphs = runner.decode_graphs
    assert graphs is not None
    ids, positions, blocks = [5, 9, 11], [0, 37, 130], [[4], [7, 8, 9], list(range(20, 29))]
    chunks = [SeqChunk(p, 1, b) for p, b in zip(positions, blocks, strict=True)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):
        for attn in runner.model.attention_layers():
            attn.k_cache.copy_(torch.randn(attn.k_cache.shape, generator=gen, device="cuda"))
            attn.v_cache.copy_(torch.randn(attn.v_cache.shape, generator=gen, device="cuda"))
        with torch.inference_mode():
            out = graphs.run(ids, positions, blocks)
            assert out is not None
            replayed = out.clone()
            eager = runner._forward_eager(_FlatInputs(ids, positions, chunks), None)
        torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)

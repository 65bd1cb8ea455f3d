"""CUDA graphs for decode-only steps: one captured model forward per batch-size bucket.

A decode-only step (every scheduled sequence has exactly one new token) runs the model from
input ids/positions to the final hidden states by replaying a graph captured for the smallest
bucket >= the batch size. The graphs read static device buffers sized for the largest bucket:

- `input_ids`, `positions`, `slot_mapping` (long; padding rows: id 0, position 0, slot -1 so
  the K/V store skips them),
- `seq_lens` (int32; padding rows 0, so the decode kernel writes zeros for them),
- `block_table` (int32 [max_bs, max_blocks], max_blocks = ceil(max_model_len / block_size)).

Each step fills pinned host copies of these with numpy (`fill_static_inputs`, a pure function
tested on the CPU), copies each buffer to the device once, replays, and slices the output.
Only the Triton attention backend is graph-safe (static shapes, no host syncs), so the runner
builds a `DecodeGraphs` only on CUDA with that backend and `enforce_eager` off.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np
import torch

from kubellm.engine.attention import AttentionMetadata, DecodeBatch

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
"""Batch sizes a graph is captured for (capped at max_num_seqs)."""
_WARMUP_RUNS = 2


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens that are still on the device: row `rows[i]` of the step's input ids is
    `tokens[src[i]]`, a sample of the previous launch (async scheduling). rows and src None:
    rows 0..prefix-1 take samples 0..prefix-1 (the steady state of a decode batch, one copy)."""

    rows: torch.Tensor | None
    src: torch.Tensor | None
    tokens: torch.Tensor
    prefix: int = 0

    def apply(self, input_ids: torch.Tensor) -> None:
        """Write the pending tokens into `input_ids` on the device, in stream order."""
        if self.rows is None or self.src is None:
            input_ids[: self.prefix].copy_(self.tokens[: self.prefix])
        else:
            input_ids[self.rows] = self.tokens[self.src]


class DecodeModel(Protocol):
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


class Replayable(Protocol):
    """A captured `torch.cuda.CUDAGraph` (or a stand-in in CPU tests)."""

    def replay(self) -> None: ...


def graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The buckets to capture: those below the cap, plus the cap (min(max_num_seqs, 256))."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    cap = min(max_num_seqs, BATCH_BUCKETS[-1])
    return tuple(sorted({b for b in BATCH_BUCKETS if b < cap} | {cap}))


def pick_bucket(sizes: tuple[int, ...], batch: int) -> int | None:
    """The smallest of `sizes` (sorted) that holds `batch` rows; None when none does."""
    if batch < 1:
        raise ValueError(f"a decode batch needs at least one row, got {batch}")
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class HostInputs:
    """numpy views of the host staging buffers (pinned on CUDA), largest-bucket sized."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray

    @property
    def max_blocks(self) -> int:
        return int(self.block_table.shape[1])


def fill_static_inputs(
    bufs: HostInputs,
    token_ids: list[int],
    positions: list[int],
    block_ids: list[list[int]],
    bucket: int,
    block_size: int,
) -> None:
    """Write rows [0, len(token_ids)) of a decode step and padding rows up to `bucket`.

    Row i is a sequence whose new token `token_ids[i]` sits at `positions[i]`, with cache
    blocks `block_ids[i]`. Block-table entries past a row's context are left as they were
    (the kernel never reads them); padding rows get id 0, position 0, slot -1, length 0 and
    an all-zero block table.
    """
    batch = len(token_ids)
    if not 0 < batch <= bucket <= bufs.input_ids.shape[0]:
        raise ValueError(f"{batch} rows do not fit bucket {bucket} of {bufs.input_ids.shape[0]}")
    if len(positions) != batch or len(block_ids) != batch:
        raise ValueError("token_ids, positions and block_ids must have one entry per row")
    pos = np.asarray(positions, dtype=np.int64)
    needed = pos // block_size + 1  # blocks holding each context, the new token included
    have = np.fromiter((len(b) for b in block_ids), dtype=np.int64, count=batch)
    if (needed > have).any() or int(needed.max()) > bufs.max_blocks:
        row = int(np.argmax((needed > have) | (needed > bufs.max_blocks)))
        raise ValueError(
            f"row {row}: position {positions[row]} needs {needed[row]} KV blocks of "
            f"{block_size}, but it has {have[row]} (at most {bufs.max_blocks} fit the table)"
        )
    total = int(needed.sum())
    pairs = zip(block_ids, needed.tolist(), strict=True)
    flat = np.fromiter(chain.from_iterable(b[:n] for b, n in pairs), np.int32, count=total)
    rows = np.repeat(np.arange(batch), needed)
    starts = np.repeat(np.cumsum(needed) - needed, needed)
    bufs.block_table[rows, np.arange(total) - starts] = flat
    bufs.block_table[batch:bucket] = 0
    bufs.input_ids[:batch] = token_ids
    bufs.input_ids[batch:bucket] = 0
    bufs.positions[:batch] = pos
    bufs.positions[batch:bucket] = 0
    last_block = bufs.block_table[np.arange(batch), needed - 1].astype(np.int64)
    bufs.slot_mapping[:batch] = last_block * block_size + pos % block_size
    bufs.slot_mapping[batch:bucket] = -1
    bufs.seq_lens[:batch] = pos + 1
    bufs.seq_lens[batch:bucket] = 0


class _StaticBuffers:
    """Device buffers the graphs read, and their host staging copies."""

    def __init__(self, max_bs: int, max_blocks: int, device: torch.device) -> None:
        def pair(shape: tuple[int, ...], dtype: torch.dtype, fill: int) -> torch.Tensor:
            pinned = device.type == "cuda"
            self.host.append(torch.full(shape, fill, dtype=dtype, pin_memory=pinned))
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.host: list[torch.Tensor] = []
        self.input_ids = pair((max_bs,), torch.long, 0)
        self.positions = pair((max_bs,), torch.long, 0)
        self.slot_mapping = pair((max_bs,), torch.long, -1)
        self.seq_lens = pair((max_bs,), torch.int32, 0)
        self.block_table = pair((max_bs, max_blocks), torch.int32, 0)
        self.on_device = [
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.seq_lens,
            self.block_table,
        ]
        self.views = HostInputs(*(h.numpy() for h in self.host))

    def upload(self, rows: int) -> None:
        """One async host-to-device copy per buffer, of the first `rows` rows."""
        for dev, host in zip(self.on_device, self.host, strict=True):
            dev[:rows].copy_(host[:rows], non_blocking=True)

    def metadata(self, rows: int) -> AttentionMetadata:
        decode = DecodeBatch(
            token_idx=None,
            block_table=self.block_table[:rows],
            mask=None,
            seq_lens=self.seq_lens[:rows],
        )
        return AttentionMetadata(self.slot_mapping[:rows], decode, ())


class DecodeGraphs:
    """Captured decode forwards per bucket; `run` replays one, or returns None (run eagerly)."""

    def __init__(
        self,
        model: DecodeModel,
        sizes: tuple[int, ...],
        max_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sizes = sizes
        self.block_size = block_size
        self.bufs = _StaticBuffers(sizes[-1], max_blocks, device)
        self.graphs: dict[int, Replayable] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0
        """Decode steps served by a graph so far."""
        self._uploaded = torch.cuda.Event() if device.type == "cuda" else None
        """Recorded after each step's uploads; the host buffers are refilled only after it.
        (Graphs exist only on CUDA; the CPU case serves tests that replay eagerly.)"""

    @property
    def max_positions(self) -> int:
        return self.bufs.views.max_blocks * self.block_size

    def capture(self) -> None:
        """Warm up every bucket on a side stream, then capture largest first into one pool."""
        started = time.monotonic()
        # Reserved by torch's allocator (graph pool and warm-up caches), from an emptied cache:
        # free device memory would also count what torch.cuda.graph's own empty_cache() returns.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved()
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for bs in self.sizes:
                    for _ in range(_WARMUP_RUNS):
                        self._forward(bs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            pool = torch.cuda.graph_pool_handle()
            for bs in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d, %d KV blocks per row) in %.2f s, "
            "using %.1f MiB of GPU memory",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            self.bufs.views.max_blocks,
            time.monotonic() - started,
            max(0, torch.cuda.memory_reserved() - reserved_before) / (1 << 20),
        )

    def _forward(self, bs: int) -> torch.Tensor:
        b = self.bufs
        return self.model(b.input_ids[:bs], b.positions[:bs], b.metadata(bs))

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        block_ids: list[list[int]],
        fix: PendingTokens | None = None,
    ) -> torch.Tensor | None:
        """Final hidden states [B, hidden] of a decode step (valid until the next replay), or
        None when no graph fits (too many rows, or a position past the block table). `fix`
        fills the rows whose input token is still on the device."""
        bucket = pick_bucket(self.sizes, len(token_ids))
        if bucket is None or max(positions) >= self.max_positions:
            return None
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the last step's copies have left the host buffers
        fill_static_inputs(
            self.bufs.views, token_ids, positions, block_ids, bucket, self.block_size
        )
        self.bufs.upload(bucket)
        if self._uploaded is not None:
            self._uploaded.record()
        if fix is not None:
            fix.apply(self.bufs.input_ids)
        self.graphs[bucket].replay()
        self.replays += 1
        return self.outputs[bucket][: len(token_ids)]


def capture_decode_graphs(
    model: DecodeModel,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    device: torch.device,
) -> DecodeGraphs | None:
    """Capture the decode graphs; on any failure log a warning and return None (eager)."""
    max_blocks = -(-max_model_len // block_size)
    graphs = DecodeGraphs(model, graph_batch_sizes(max_num_seqs), max_blocks, block_size, device)
    try:
        graphs.capture()
    except Exception as exc:  # a failed capture must not kill the engine: run eagerly
        logger.warning("CUDA graph capture failed, running decode steps eagerly: %s", exc)
        logger.debug("capture failure", exc_info=True)
        del graphs
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # nothing more to free; the eager path will report a broken device
            logger.debug("cleanup after the failed capture", exc_info=True)
        return None
    return graphs

"""The model runner: owns the model, the paged KV cache and the sampler.

`execute(SchedulerOutput)` flattens the scheduled chunks into one batch, runs the model once,
computes logits only for the rows that sample, and returns one `SampleResult` per entry with
`sample=True`, in order. It reads `Sequence` state and never changes it: the scheduler owns it.

On CUDA with the Triton attention backend (and `enforce_eager` off), decode-only steps replay
CUDA graphs captured per batch-size bucket (`kubellm.engine.cuda_graphs`); mixed and prefill
steps, and every step on the CPU, run the model eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kubellm.engine.attention import SeqChunk, build_attention_metadata
from kubellm.engine.config import ModelConfig
from kubellm.engine.cuda_graphs import DecodeGraphs, PendingTokens, capture_decode_graphs
from kubellm.engine.kernels.choice import resolve_attention_backend
from kubellm.engine.loader import load_weights
from kubellm.engine.models import build_model
from kubellm.engine.sampler import SampledBatch, Sampler
from kubellm.engine.sequence import SampleResult, SchedulerOutput, Sequence
from kubellm.engine.transfer import device_tensor
from kubellm.protocol.settings import EngineSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CUDA_MARGIN_BYTES = 1 << 30
"""GPU memory kept free for activations and the allocator when sizing the KV cache."""


class KVCacheSizeError(ValueError):
    """Not even one KV block fits in the memory the settings allow."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, settings: EngineSettings) -> None:
        started = time.monotonic()
        self.model_config = model_config
        self.torch_device = resolve_device(settings.device)
        self.torch_dtype = resolve_dtype(settings.dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.block_size = settings.block_size
        self.attention_backend = resolve_attention_backend(
            settings.attention_backend, self.torch_device
        )
        self.eos_token_ids = model_config.eos_token_ids
        self.fused_kernels = settings.fused_kernels
        torch.manual_seed(settings.seed)
        max_positions = settings.max_model_len or model_config.max_position_embeddings
        self.model = build_model(model_config, max_positions, self.torch_dtype, self.torch_device)
        load_weights(self.model, model_config.model_dir)
        self.num_kv_blocks = settings.num_kv_blocks or self._derive_num_blocks(settings)
        self._allocate_kv_cache()
        self.decode_graphs = self._capture_graphs(settings, max_positions)
        self.sampler = Sampler(self.torch_device, settings.seed, self.eos_token_ids)
        self._last_tokens: torch.Tensor | None = None
        """The latest launch's sampled tokens, on the device [S]."""
        self._last_rows: dict[Sequence, int] = {}
        """Row of each sequence in `_last_tokens`."""
        logger.info(
            "model runner ready: %s on %s (%s), %d KV blocks of %d tokens, %s attention, "
            "fused kernels %s, decode CUDA graphs %s, in %.2f s",
            model_config.architecture,
            self.device,
            self.dtype,
            self.num_kv_blocks,
            self.block_size,
            self.attention_backend,
            "on" if self.attention_backend == "triton" and self.fused_kernels else "off",
            "on" if self.decode_graphs is not None else "off",
            time.monotonic() - started,
        )

    @property
    def kv_block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.model_config.kv_elements_per_token * self.block_size * elem

    def _derive_num_blocks(self, settings: EngineSettings) -> int:
        if self.torch_device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.torch_device)
            budget = free - total * (1 - settings.gpu_memory_utilization) - _CUDA_MARGIN_BYTES
        else:
            budget = settings.kv_cache_memory_gib * (1 << 30)
        blocks = int(budget // self.kv_block_bytes)
        if blocks < 1:
            raise KVCacheSizeError(
                f"no KV cache block ({self.kv_block_bytes} bytes) fits in {budget:.0f} bytes; "
                "raise --kv-cache-memory-gib / --gpu-memory-utilization or set --num-kv-blocks"
            )
        return blocks

    def _allocate_kv_cache(self) -> None:
        cfg = self.model_config
        shape = (self.num_kv_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        for attn in self.model.attention_layers():
            # Zeros, not empty: masked-out padding slots must hold finite values.
            attn.k_cache = torch.zeros(shape, dtype=self.torch_dtype, device=self.torch_device)
            attn.v_cache = torch.zeros(shape, dtype=self.torch_dtype, device=self.torch_device)
            attn.set_backend(self.attention_backend)
        if self.attention_backend == "triton" and self.fused_kernels:
            from kubellm.engine.kernels import triton_fused

            self.model.use_kernels(triton_fused)

    def _capture_graphs(self, settings: EngineSettings, max_positions: int) -> DecodeGraphs | None:
        """Decode CUDA graphs on CUDA with the Triton backend unless `enforce_eager`; else None."""
        if self.torch_device.type != "cuda" or self.attention_backend != "triton":
            return None
        if settings.enforce_eager:
            logger.info("enforce_eager is set: decode steps run without CUDA graphs")
            return None
        return capture_decode_graphs(
            self.model, settings.max_num_seqs, max_positions, self.block_size, self.torch_device
        )

    def execute(self, batch: SchedulerOutput) -> list[SampleResult]:
        """Run one step; one result per scheduled entry with sample=True, in order."""
        return self.launch(batch).wait()

    def launch(self, batch: SchedulerOutput) -> RunnerStep:
        """Queue one step on the device and return at once; `wait()` gives its results.

        An entry may start one token past its sequence's known tokens (async scheduling): that
        input token is the one the previous launch sampled for the same sequence, read from
        the device without a round trip through the host.
        """
        if not batch.scheduled:
            return RunnerStep(None)
        inputs = self._flatten(batch)
        with torch.inference_mode():
            fix = self._pending_fix(inputs.pending)
            hidden = None
            if self.decode_graphs is not None and len(inputs.input_ids) == len(inputs.chunks):
                block_ids = [c.block_ids for c in inputs.chunks]
                hidden = self.decode_graphs.run(
                    inputs.input_ids, inputs.positions, block_ids, fix=fix
                )
            if hidden is None:
                hidden = self._forward_eager(inputs, fix)
            if not inputs.sample_rows:
                return RunnerStep(None)
            if len(inputs.sample_rows) < len(inputs.input_ids):
                hidden = hidden[device_tensor(inputs.sample_rows, torch.long, self.torch_device)]
            logits = self.model.compute_logits(hidden)
            seqs = [e.seq for e in batch.scheduled if e.sample]
            sampled = self.sampler.sample(logits, seqs)
        self._last_tokens = sampled.tokens
        self._last_rows = {seq: i for i, seq in enumerate(seqs)}
        return RunnerStep(sampled)

    def _flatten(self, batch: SchedulerOutput) -> _FlatInputs:
        flat = _FlatInputs()
        for entry in batch.scheduled:
            seq = entry.seq
            start = seq.num_computed_tokens
            end = start + entry.num_new_tokens
            known = len(seq.token_ids)
            if entry.num_new_tokens < 1 or end > known + min(seq.num_pending_tokens, 1):
                raise ValueError(
                    f"request {seq.request_id}: cannot compute tokens [{start}, {end}) of "
                    f"{known} (+{seq.num_pending_tokens} pending)"
                )
            flat.input_ids.extend(seq.token_ids[start:end])
            if end > known:  # the last input token is the previous launch's sample
                row = self._last_rows.get(seq)
                if row is None:
                    raise ValueError(
                        f"request {seq.request_id}: its pending token was not sampled by the "
                        "previous step"
                    )
                flat.pending.append((len(flat.input_ids), row))
                flat.input_ids.append(0)
            flat.positions.extend(range(start, end))
            flat.chunks.append(SeqChunk(start, entry.num_new_tokens, seq.block_ids))
            if entry.sample:
                flat.sample_rows.append(len(flat.input_ids) - 1)
        return flat

    def _pending_fix(self, pending: list[tuple[int, int]]) -> PendingTokens | None:
        """Device index pairs (flat row, previous sample row) for the pending input tokens."""
        if not pending or self._last_tokens is None:
            return None
        if all(row == i and src == i for i, (row, src) in enumerate(pending)):
            return PendingTokens(None, None, self._last_tokens, len(pending))
        dev = self.torch_device
        rows = device_tensor([p[0] for p in pending], torch.long, dev)
        src = device_tensor([p[1] for p in pending], torch.long, dev)
        return PendingTokens(rows, src, self._last_tokens)

    def _forward_eager(self, inputs: _FlatInputs, fix: PendingTokens | None) -> torch.Tensor:
        dev = self.torch_device
        meta = build_attention_metadata(
            inputs.chunks, self.block_size, dev, backend=self.attention_backend
        )
        ids_t = device_tensor(inputs.input_ids, torch.long, dev)
        if fix is not None:
            fix.apply(ids_t)
        pos_t = device_tensor(inputs.positions, torch.long, dev)
        return self.model(ids_t, pos_t, meta)


@dataclass
class _FlatInputs:
    """A step's scheduled chunks flattened into one batch of tokens."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    chunks: list[SeqChunk] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)
    """(flat row, row of the previous launch's samples) of each pending input token."""


class RunnerStep:
    """A launched step (`StepHandle` of `kubellm.engine.llm_engine`)."""

    def __init__(self, sampled: SampledBatch | None) -> None:
        self._sampled = sampled

    def wait(self) -> list[SampleResult]:
        return self._sampled.results() if self._sampled is not None else []

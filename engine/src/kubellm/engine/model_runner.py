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

import torch

from kubellm.engine.attention import SeqChunk, build_attention_metadata
from kubellm.engine.config import ModelConfig
from kubellm.engine.cuda_graphs import DecodeGraphs, capture_decode_graphs
from kubellm.engine.kernels.choice import resolve_attention_backend
from kubellm.engine.loader import load_weights
from kubellm.engine.models import build_model
from kubellm.engine.sampler import Sampler
from kubellm.engine.sequence import SampleResult, SchedulerOutput
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
        torch.manual_seed(settings.seed)
        max_positions = settings.max_model_len or model_config.max_position_embeddings
        self.model = build_model(model_config, max_positions, self.torch_dtype, self.torch_device)
        load_weights(self.model, model_config.model_dir)
        self.num_kv_blocks = settings.num_kv_blocks or self._derive_num_blocks(settings)
        self._allocate_kv_cache()
        self.decode_graphs = self._capture_graphs(settings, max_positions)
        self.sampler = Sampler(self.torch_device, settings.seed, self.eos_token_ids)
        logger.info(
            "model runner ready: %s on %s (%s), %d KV blocks of %d tokens, %s attention, "
            "decode CUDA graphs %s, in %.2f s",
            model_config.architecture,
            self.device,
            self.dtype,
            self.num_kv_blocks,
            self.block_size,
            self.attention_backend,
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
        if not batch.scheduled:
            return []
        input_ids: list[int] = []
        positions: list[int] = []
        chunks: list[SeqChunk] = []
        sample_rows: list[int] = []
        for entry in batch.scheduled:
            seq = entry.seq
            start = seq.num_computed_tokens
            end = start + entry.num_new_tokens
            if entry.num_new_tokens < 1 or end > len(seq.token_ids):
                raise ValueError(
                    f"request {seq.request_id}: cannot compute tokens [{start}, {end}) of "
                    f"{len(seq.token_ids)}"
                )
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            chunks.append(SeqChunk(start, entry.num_new_tokens, seq.block_ids))
            if entry.sample:
                sample_rows.append(len(input_ids) - 1)
        with torch.inference_mode():
            hidden = None
            if self.decode_graphs is not None and len(input_ids) == len(chunks):
                block_ids = [c.block_ids for c in chunks]
                hidden = self.decode_graphs.run(input_ids, positions, block_ids)
            if hidden is None:
                hidden = self._forward_eager(input_ids, positions, chunks)
            if not sample_rows:
                return []
            if len(sample_rows) < len(input_ids):
                rows = torch.tensor(sample_rows, dtype=torch.long, device=self.torch_device)
                hidden = hidden[rows]
            logits = self.model.compute_logits(hidden)
            seqs = [e.seq for e in batch.scheduled if e.sample]
            return self.sampler(logits, seqs)

    def _forward_eager(
        self, input_ids: list[int], positions: list[int], chunks: list[SeqChunk]
    ) -> torch.Tensor:
        dev = self.torch_device
        meta = build_attention_metadata(
            chunks, self.block_size, dev, decode_mask=self.attention_backend == "torch"
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return self.model(ids_t, pos_t, meta)

"""Tiny random Hugging Face checkpoints (saved with `save_pretrained`) for engine tests.

Each one exercises one switch of our model code: llama3 RoPE scaling with tied embeddings,
an untied Llama with q/k/v/o biases, Qwen2 (q/k/v bias) and Qwen3 (q/k norm, explicit head_dim).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 320
EOS = 2
BOS = 1

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}

KINDS = ("llama_tied_llama3", "llama_untied", "qwen2", "qwen3")


def _config(kind: str) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if kind == "llama_tied_llama3":
        return LlamaConfig(
            **_COMMON,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if kind == "llama_untied":
        return LlamaConfig(**_COMMON, tie_word_embeddings=False, attention_bias=True)
    if kind == "qwen2":
        return Qwen2Config(
            **_COMMON,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        )
    if kind == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=24, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny checkpoint kind {kind!r}")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norms and biases included) visible random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def make_checkpoint(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random `kind` model to `out_dir` (float32) and return the directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind), dtype=torch.float32)
    _randomise(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out_dir)
    return out_dir


def load_hf(path: Path) -> Any:
    """The saved checkpoint as a transformers model (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_CACHE: dict[str, Path] = {}


def cached_checkpoint(kind: str, base: Path) -> Path:
    """`make_checkpoint(kind)` once per test session, under the session's `base` directory."""
    path = _CACHE.get(kind)
    if path is None or not path.is_dir():
        path = make_checkpoint(kind, base / kind)
        _CACHE[kind] = path
    return path


def random_prompt(n: int, seed: int) -> list[int]:
    """n token ids in [3, VOCAB), reproducible from `seed` (ids 0-2 are special)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

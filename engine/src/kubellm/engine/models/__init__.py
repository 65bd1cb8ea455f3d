"""Model registry: Hugging Face architecture name -> our model class."""

from __future__ import annotations

import torch

from kubellm.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from kubellm.engine.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def build_model(
    cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """An uninitialised model (parameters are `torch.empty`) of `cfg`'s architecture."""
    cls = MODEL_CLASSES.get(cfg.architecture)
    if cls is None:
        raise UnsupportedModelError(
            f"unsupported architecture {cfg.architecture}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    with torch.device(device):
        model = cls(cfg, max_positions, dtype)
    return model.to(dtype=dtype).eval()

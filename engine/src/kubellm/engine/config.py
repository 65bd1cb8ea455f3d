"""Model configuration read from a Hugging Face checkpoint directory.

Torch-free: the API server side and the engine's torch-free modules may import it. Only the
fields our model code needs are kept; anything we cannot run is refused here, with a clear
message, before any weights are read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelConfigError(ValueError):
    """The checkpoint's configuration is missing or cannot be read."""


class ModelNotFoundError(ModelConfigError, FileNotFoundError):
    """The model directory or its config.json does not exist."""


class UnsupportedModelError(ModelConfigError):
    """The checkpoint uses an architecture or a feature our model code does not implement."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1-style frequency scaling of RoPE ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool
    """Whether q/k/v projections have a bias (always for Qwen2)."""
    o_proj_bias: bool
    """Whether the attention output projection has a bias (Llama/Qwen3 `attention_bias`)."""
    qk_norm: bool
    """Per-head RMSNorm of q and k before RoPE (Qwen3)."""
    dtype: str | None
    """The checkpoint's torch_dtype/dtype, e.g. "bfloat16" (None when not stated)."""
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` when present) from `path`."""
        model_dir = Path(path)
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"model directory {str(model_dir)!r} does not exist")
        cfg = _read_json(model_dir / "config.json", required=True)
        gen = _read_json(model_dir / "generation_config.json", required=False)
        return cls.from_dicts(str(model_dir), cfg, gen)

    @classmethod
    def from_dicts(cls, model_dir: str, cfg: dict[str, Any], gen: dict[str, Any]) -> ModelConfig:
        """Build from the parsed config.json and generation_config.json contents."""
        arch = _architecture(cfg)
        _refuse_unsupported_features(cfg)
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        if heads <= 0 or (hidden % heads and cfg.get("head_dim") is None):
            raise ModelConfigError("hidden_size must be a multiple of num_attention_heads")
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if kv_heads <= 0 or heads % kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        flag_bias = bool(cfg.get("attention_bias", False))
        eos = _merge_ids(cfg.get("eos_token_id"), gen.get("eos_token_id"))
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        rope_theta, rope_scaling = _rope(cfg)
        return cls(
            model_dir=model_dir,
            architecture=arch,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=_int(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=_int(cfg, "intermediate_size"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            attention_bias=True if arch == "Qwen2ForCausalLM" else flag_bias,
            o_proj_bias=False if arch == "Qwen2ForCausalLM" else flag_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=_dtype_name(cfg),
            eos_token_ids=eos,
            bos_token_id=int(bos) if isinstance(bos, int) else None,
        )

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements stored per token over all layers (multiply by the element size)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelNotFoundError(
                f"{path.name} not found in model directory {str(path.parent)!r}"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{str(path)!r} does not hold a JSON object")
    return data


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise UnsupportedModelError(
            "config.json names no architecture; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(map(str, archs))}; supported: "
        + ", ".join(SUPPORTED_ARCHITECTURES)
    )


def _refuse_unsupported_features(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention is not supported")
    params = cfg.get("rope_parameters")
    partial = (params if isinstance(params, dict) else cfg).get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")


def _int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _merge_ids(*values: Any) -> tuple[int, ...]:
    """Union of token ids given as an int, a list of ints or None, in first-seen order."""
    out: list[int] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and item not in out:
                out.append(item)
    return tuple(out)


def _dtype_name(cfg: dict[str, Any]) -> str | None:
    value = cfg.get("dtype", cfg.get("torch_dtype"))
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def _rope(cfg: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """rope_theta and scaling from `rope_parameters` (transformers 5) or the older keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(next(iter(params.values()), None), dict):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    params = params if isinstance(params, dict) else {}
    scaling = cfg.get("rope_scaling")
    scaling = scaling if isinstance(scaling, dict) else params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: default, llama3"
        )
    try:
        return float(theta), Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelConfigError(f"incomplete llama3 rope scaling parameters: {exc}") from exc

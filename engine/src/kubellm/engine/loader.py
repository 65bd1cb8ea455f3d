"""Load Hugging Face *.safetensors weights into our model, strictly.

Handles a single `model.safetensors`, any set of `*.safetensors` files, or a sharded
checkpoint described by `model.safetensors.index.json`. Hugging Face tensor names are mapped
onto our parameters (packed q/k/v and gate/up projections are filled slice by slice), tied
embeddings are honoured, and every tensor is converted to the parameter's dtype. Any missing,
unexpected or mis-shaped tensor is a `WeightLoadError` naming it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """The checkpoint's tensors do not match the model."""


@dataclass(frozen=True)
class _Target:
    param_name: str
    param: torch.Tensor
    offset: int
    """First row (dim 0) of the parameter this tensor fills."""
    rows: int
    """Rows (dim 0) it fills."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, sorted; raises WeightLoadError when none."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise WeightLoadError(f"cannot read {str(index)!r}: {exc}") from exc
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"shards listed in {INDEX_FILE} are missing: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {str(root)!r}")
    return files


def _targets(model: nn.Module) -> dict[str, _Target]:
    """Hugging Face tensor name -> where it goes in our model."""
    packed: dict[str, tuple[str, ...]] = getattr(model, "packed_modules", {})
    targets: dict[str, _Target] = {}
    for name, param in model.named_parameters():
        for packed_name, parts in packed.items():
            token = f".{packed_name}."
            if token in name:
                rows = param.shape[0]
                sizes = _split_sizes(model, packed_name, rows, len(parts))
                offset = 0
                for part, size in zip(parts, sizes, strict=True):
                    hf_name = name.replace(token, f".{part}.")
                    targets[hf_name] = _Target(name, param, offset, size)
                    offset += size
                break
        else:
            targets[name] = _Target(name, param, 0, param.shape[0])
    return targets


def _split_sizes(model: nn.Module, packed_name: str, rows: int, parts: int) -> list[int]:
    """Rows of each part of a packed parameter (q/k/v sizes differ under GQA)."""
    cfg = getattr(model, "config", None)
    if packed_name == "qkv_proj" and cfg is not None:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        return [q, kv, kv]
    return [rows // parts] * parts


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`."""
    started = time.monotonic()
    targets = _targets(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    duplicated: list[str] = []
    files = checkpoint_files(model_dir)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                target = targets.get(key)
                if target is None:
                    if not key.endswith(_IGNORED_SUFFIXES) and not (
                        tied and key == "lm_head.weight"
                    ):
                        unexpected.append(key)
                    continue
                if key in loaded:
                    duplicated.append(key)
                _copy(key, f.get_tensor(key), target)
                loaded.add(key)
    _check_complete(targets, loaded, unexpected, duplicated)
    logger.info(
        "loaded %d tensors from %d file(s) in %.2f s",
        len(loaded),
        len(files),
        time.monotonic() - started,
    )


def _copy(key: str, tensor: torch.Tensor, target: _Target) -> None:
    dest = target.param.data.narrow(0, target.offset, target.rows)
    if tuple(dest.shape) != tuple(tensor.shape):
        raise WeightLoadError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(tensor.to(dtype=dest.dtype))


def _check_complete(
    targets: dict[str, _Target], loaded: set[str], unexpected: list[str], duplicated: list[str]
) -> None:
    missing = sorted(set(targets) - loaded)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected)[:10])}")
    if duplicated:
        problems.append(f"tensors found twice: {', '.join(sorted(duplicated)[:10])}")
    if problems:
        raise WeightLoadError("checkpoint does not match the model: " + "; ".join(problems))

"""Convert a llama-architecture GGUF file into a Hugging Face checkpoint directory.

Torch-free (gguf, numpy, safetensors.numpy, tokenizers): the API server imports `model_files`,
which imports this module.

What it writes into `out_dir`:
- `model.safetensors`: every tensor dequantized to float32 under its Hugging Face name.
  llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so that its interleaved
  (GPT-J style) RoPE applies; we invert that permutation so that Hugging Face's half-split RoPE
  applies instead.
- `config.json`, `generation_config.json`: `LlamaForCausalLM`, values read from the metadata.
- `tokenizer.json`, `tokenizer_config.json`: the byte-level BPE tokenizer described by the
  `tokenizer.ggml.*` metadata, and the chat template.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp applies them. Each entry is a list of
# regexes applied one after the other (each one splitting the pieces the previous one left); the
# GPT-2 regex itself comes from `ByteLevel(use_regex=True)`. For "smollm" this equals SmolLM2's own
# tokenizer.json (Digits(individual_digits) + ByteLevel). transformers' GGUF loader (5.23) has no
# "smollm" entry and skips the digit split, so it differs from us (and from llama.cpp) on digits
# after a run of whitespace ("a   42") and on non-ASCII numerals after a space (" ½").
_DIGIT_SPLIT = r"\p{N}"
_PRE_SPLITS: dict[str, list[str]] = {
    "gpt2": [],
    "default": [],
    "smollm": [_DIGIT_SPLIT],
    "starcoder": [_DIGIT_SPLIT],
    "refact": [_DIGIT_SPLIT],
    "codeshell": [_DIGIT_SPLIT],
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture, tokenizer or tensor)."""


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Convert `gguf_path` into a Hugging Face checkpoint in `out_dir` (created if missing).

    Returns `out_dir`. Shows a tqdm bar over the tensors on stderr unless `progress` is False.
    """
    import gguf

    gguf_path, out = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _Metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(
            f"{gguf_path}: architecture {arch!r} is not supported; only 'llama' GGUF files convert"
        )
    config = _hf_config(meta)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _convert_tensors(reader, config, progress=progress)
    if "lm_head.weight" in tensors:
        config["tie_word_embeddings"] = False
    _save_safetensors(tensors, out / "model.safetensors")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    tokenizer, tokenizer_config = build_tokenizer(meta)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    logger.info("converted %s (%d tensors) into %s", gguf_path.name, len(tensors), out)
    return out


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise GGUFConversionError(f"GGUF metadata has no {key!r}")
        return self.get(key)


def _hf_config(meta: _Metadata) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json from the `llama.*` metadata."""
    n_heads = int(meta.require("llama.attention.head_count"))
    hidden = int(meta.require("llama.embedding_length"))
    vocab_size = meta.get("llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(meta.require("tokenizer.ggml.tokens"))
    rope_theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // n_heads))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.require("llama.context_length")),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None,
        "vocab_size": int(vocab_size),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _f32(value: Any) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if config.get(key) is not None}


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama GGUF tensor, e.g. `blk.3.attn_q.weight` →
    `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved → half-split RoPE layout).

    llama.cpp reshapes the rows of each head as (2, head_dim/2) and swaps the two axes; swapping
    them back on the (head_dim/2, 2) view restores the original order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFConversionError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _convert_tensors(
    reader: Any, config: dict[str, Any], *, progress: bool
) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 and rename it; undo the Q/K permutation."""
    from gguf.quants import dequantize

    n_heads = config["num_attention_heads"]
    n_kv_heads = config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for tensor in _progress(reader.tensors, progress, desc="converting GGUF"):
        name = hf_tensor_name(tensor.name)
        # GGUF lists dims fastest-first; numpy (and dequantize's result) is slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rows(array, n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rows(array, n_kv_heads)
        out[name] = np.ascontiguousarray(array)
    return out


def _progress(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr)


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(meta: _Metadata) -> tuple[Any, dict[str, Any]]:
    """The `tokenizers.Tokenizer` and the tokenizer_config.json content the metadata describes."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(
            f"tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') converts"
        )
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    merges = [str(m) for m in meta.require("tokenizer.ggml.merges")]
    token_types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if len(token_types) != len(tokens):
        raise GGUFConversionError(
            f"{len(tokens)} tokens but {len(token_types)} token types in the GGUF metadata"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer = _byte_level_bpe(tokens, merges, _pre_splits(pre))
    config = _tokenizer_config(meta, tokens)
    named = [config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in config]
    _add_special_tokens(tokenizer, tokens, token_types, named)
    return tokenizer, config


def _pre_splits(pre: str) -> list[str]:
    if pre not in _PRE_SPLITS:
        raise GGUFConversionError(
            f"pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}"
        )
    return _PRE_SPLITS[pre]


def _byte_level_bpe(tokens: list[str], merges: list[str], splits: list[str]) -> Any:
    """A GPT-2 style byte-level BPE tokenizer (no prefix space, ByteLevel decoder)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {_byte_spelling(tok, alphabet): index for index, tok in enumerate(tokens)}
    pairs = [_merge_pair(merge) for merge in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    steps: list[Any] = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise GGUFConversionError(f"malformed BPE merge {merge!r} in the GGUF metadata")
    return left, right


def _byte_spelling(token: str, alphabet: set[str]) -> str:
    """A token in the byte-level alphabet (GGUF files sometimes store raw UTF-8 instead)."""
    if set(token) <= alphabet:
        return token
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in byte_level.pre_tokenize_str(token))


def _add_special_tokens(
    tokenizer: Any, tokens: list[str], token_types: list[int], named: list[str]
) -> None:
    """Control tokens (and the named bos/eos/pad/unk ones) become special added tokens;
    user-defined ones become plain added tokens, so that both always match whole."""
    from tokenizers import AddedToken

    special = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _TOKEN_CONTROL]
    special += [t for t in named if t not in special]
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _TOKEN_USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in special]
        )
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _tokenizer_config(meta: _Metadata, tokens: list[str]) -> dict[str, Any]:
    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        # transformers' GGUF loader reads these two flags as they are (default False for BPE).
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = str(template)
    return {key: value for key, value in config.items() if value is not None}

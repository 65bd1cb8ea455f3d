"""ModelConfig, the weight loader and one forward pass against transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch

from kubellm.engine.attention import SeqChunk, build_attention_metadata
from kubellm.engine.config import (
    Llama3RopeScaling,
    ModelConfig,
    ModelConfigError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from kubellm.engine.layers import rope_inv_freq
from kubellm.engine.loader import WeightLoadError, load_weights
from kubellm.engine.models import build_model
from kubellm.engine.models.llama import LlamaForCausalLM

CPU = torch.device("cpu")


def _write_config(path: Path, cfg: dict[str, object], gen: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


BASE_CFG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


# ---- config -------------------------------------------------------------------------------


def test_config_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match=r"config\.json not found"):
        ModelConfig.from_dir(tmp_path)


def test_config_unsupported_architecture_names_supported(tmp_path: Path) -> None:
    d = _write_config(tmp_path, {**BASE_CFG, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_dir(d)
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_config_defaults_and_eos_union(tmp_path: Path) -> None:
    d = _write_config(
        tmp_path,
        {**BASE_CFG, "eos_token_id": [2, 7], "bos_token_id": 1, "torch_dtype": "bfloat16"},
        {"eos_token_id": [7, 9]},
    )
    cfg = ModelConfig.from_dir(d)
    assert cfg.head_dim == 16
    assert cfg.eos_token_ids == (2, 7, 9)
    assert cfg.bos_token_id == 1
    assert cfg.dtype == "bfloat16"
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert not cfg.attention_bias and not cfg.qk_norm and not cfg.tie_word_embeddings


def test_config_rope_in_both_places(tmp_path: Path) -> None:
    old = _write_config(
        tmp_path / "old",
        {
            **BASE_CFG,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    )
    new = _write_config(
        tmp_path / "new",
        {
            **BASE_CFG,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    )
    expected = Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    for d in (old, new):
        cfg = ModelConfig.from_dir(d)
        assert cfg.rope_theta == 500000.0
        assert cfg.rope_scaling == expected


def test_config_refuses_other_rope_types(tmp_path: Path) -> None:
    d = _write_config(
        tmp_path, {**BASE_CFG, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    )
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dir(d)


def test_config_bias_and_qk_norm_per_architecture(tmp_path: Path) -> None:
    qwen2 = ModelConfig.from_dir(
        _write_config(tmp_path / "q2", {**BASE_CFG, "architectures": ["Qwen2ForCausalLM"]})
    )
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_dir(
        _write_config(tmp_path / "q3", {**BASE_CFG, "architectures": ["Qwen3ForCausalLM"]})
    )
    assert qwen3.qk_norm and not qwen3.attention_bias
    llama = ModelConfig.from_dir(
        _write_config(tmp_path / "l", {**BASE_CFG, "attention_bias": True})
    )
    assert llama.attention_bias and llama.o_proj_bias


def test_config_bad_values(tmp_path: Path) -> None:
    d = _write_config(tmp_path, {**BASE_CFG, "num_key_value_heads": 3})
    with pytest.raises(ModelConfigError, match="multiple"):
        ModelConfig.from_dir(d)
    d = _write_config(tmp_path / "x", {**BASE_CFG, "vocab_size": "many"})
    with pytest.raises(ModelConfigError, match="vocab_size"):
        ModelConfig.from_dir(d)


@pytest.mark.slow
def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    hf_cfg = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, **scaling.__dict__},
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, CPU)
    ours = rope_inv_freq(64, 50000.0, scaling)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.equal(ours, rope_inv_freq(64, 50000.0, None))


# ---- loader -------------------------------------------------------------------------------


def _forward_logits(
    model: LlamaForCausalLM, ids: torch.Tensor, block_size: int = 4
) -> torch.Tensor:
    cfg = model.config
    blocks = (ids.numel() + block_size - 1) // block_size
    cfg_dtype = next(model.parameters()).dtype
    for attn in model.attention_layers():
        shape = (blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=cfg_dtype)
        attn.v_cache = torch.zeros(shape, dtype=cfg_dtype)
    meta = build_attention_metadata(
        [SeqChunk(0, ids.numel(), list(range(blocks)))], block_size, CPU
    )
    with torch.inference_mode():
        hidden = model(ids, torch.arange(ids.numel()), meta)
        return model.compute_logits(hidden).float()


def _load(path: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    cfg = ModelConfig.from_dir(path)
    model = build_model(cfg, cfg.max_position_embeddings, dtype, CPU)
    load_weights(model, path)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", tc.KINDS)
def test_forward_matches_transformers(tiny_dirs: dict[str, Path], kind: str) -> None:
    path = tiny_dirs[kind]
    model = _load(path)
    hf = tc.load_hf(path)
    ids = torch.randint(0, tc.VOCAB, (45,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    ours = _forward_logits(model, ids)
    assert ours.dtype == torch.float32 and ours.shape == (45, tc.VOCAB)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_loader_sharded_and_bf16(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = tc.load_hf(tiny_dirs["qwen3"])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.arange(3, 40)
    sharded = _forward_logits(_load(tmp_path), ids)
    single = _forward_logits(_load(tiny_dirs["qwen3"]), ids)
    torch.testing.assert_close(sharded, single, atol=0, rtol=0)
    bf16 = _load(tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    torch.testing.assert_close(_forward_logits(bf16, ids), single, atol=0.25, rtol=0.05)


@pytest.mark.slow
def test_loader_tied_embeddings_share_the_head(tiny_dirs: dict[str, Path]) -> None:
    model = _load(tiny_dirs["llama_tied_llama3"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = _load(tiny_dirs["llama_untied"])
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.slow
def test_loader_is_strict(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_dirs["qwen2"]
    missing = _rewrite(src, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        WeightLoadError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        _load(missing)
    extra = _rewrite(src, tmp_path / "e", lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(WeightLoadError, match=r"unexpected tensors: model\.extra\.weight"):
        _load(extra)
    bad = _rewrite(src, tmp_path / "b", lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight"):
        _load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes((src / "config.json").read_bytes())
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors"):
        _load(empty)


# ---- paged attention against a dense reference ---------------------------------------------


def _dense_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """q [n, Hq, D] at positions first_pos.., keys/values [L, Hk, D] -> [n, Hq * D]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(first_pos, first_pos + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("all_decode", [False, True])
def test_paged_attention_matches_dense(all_decode: bool) -> None:
    from kubellm.engine.attention import PagedAttention

    gen = torch.Generator().manual_seed(7)
    hq, hk, d, bs, num_blocks = 6, 2, 8, 4, 40
    attn = PagedAttention(hq, hk, d)
    attn.k_cache = torch.zeros(num_blocks, bs, hk, d)
    attn.v_cache = torch.zeros(num_blocks, bs, hk, d)
    # (already computed, new) per sequence: fresh prefill, prefix hit, decodes, long context.
    shapes = [(0, 1), (9, 1), (22, 1)] if all_decode else [(0, 7), (9, 1), (8, 5), (22, 1), (0, 1)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    chunks, full_k, full_v = [], [], []
    for done, new in shapes:
        blocks = [free.pop() for _ in range((done + new + bs - 1) // bs)]
        k = torch.randn(done + new, hk, d, generator=gen)
        v = torch.randn(done + new, hk, d, generator=gen)
        for p in range(done):  # the context computed in earlier steps is already cached
            attn.k_cache[blocks[p // bs], p % bs] = k[p]
            attn.v_cache[blocks[p // bs], p % bs] = v[p]
        chunks.append(SeqChunk(done, new, blocks))
        full_k.append(k)
        full_v.append(v)
    meta = build_attention_metadata(chunks, bs, CPU)
    assert (meta.decode is not None) == any(new == 1 for _, new in shapes)
    assert all_decode == (meta.decode is not None and meta.decode.token_idx is None)
    total = sum(new for _, new in shapes)
    q = torch.randn(total, hq, d, generator=gen)
    new_k = torch.cat([k[done:] for k, (done, _) in zip(full_k, shapes, strict=True)])
    new_v = torch.cat([v[done:] for v, (done, _) in zip(full_v, shapes, strict=True)])
    out = attn(q, new_k, new_v, meta)
    offset = 0
    for (done, new), k, v in zip(shapes, full_k, full_v, strict=True):
        ref = _dense_reference(q[offset : offset + new], k, v, done)
        torch.testing.assert_close(out[offset : offset + new], ref, atol=1e-5, rtol=1e-5)
        offset += new


def test_metadata_refuses_too_few_blocks() -> None:
    with pytest.raises(ValueError, match="2 KV blocks of 4 cannot hold 9 tokens"):
        build_attention_metadata([SeqChunk(6, 3, [0, 1])], 4, CPU)
    meta = build_attention_metadata([SeqChunk(6, 2, [5, 1]), SeqChunk(0, 1, [3])], 4, CPU)
    assert meta.slot_mapping.tolist() == [1 * 4 + 2, 1 * 4 + 3, 3 * 4]

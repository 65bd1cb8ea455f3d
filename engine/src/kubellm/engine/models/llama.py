"""One decoder covering LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM.

The three differ only in small switches of `ModelConfig`: q/k/v bias (Qwen2, or Llama's
`attention_bias`), per-head q/k RMSNorm before RoPE (Qwen3) and tied embeddings. Q/K/V and
gate/up projections are packed into one matmul each; `packed_modules` tells the loader which
Hugging Face tensors make up each packed parameter, in order.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from kubellm.engine.attention import AttentionMetadata, PagedAttention
from kubellm.engine.config import ModelConfig
from kubellm.engine.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SiluAndMul


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = [rope]  # a list, so the shared module is not registered once per layer
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.kernels: ModuleType | None = None
        """The fused Triton kernels: q/k norm, RoPE and the K/V store in one launch."""

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self.kernels is not None:
            return self._forward_fused(self.kernels, positions, x, meta)
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rope[0](positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))

    def _forward_fused(
        self, kernels: ModuleType, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        rope = self.rope[0]
        q = kernels.qk_norm_rope_store(
            self.qkv_proj(x),
            positions,
            rope.cos,
            rope.sin,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 0.0,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.attn.k_cache,
            self.attn.v_cache,
            meta.slot_mapping,
        )
        return self.o_proj(self.attn.attend(q, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.act = SiluAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.kernels: ModuleType | None = None
        """The fused Triton kernels: one row's gate/up projection and SiLU-mul in one launch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels
        one_row = x.dim() == 2 and x.shape[0] == 1
        if kernels is not None and one_row and self.gate_up_proj.bias is None:
            return self.down_proj(kernels.skinny_gate_up_silu(x, self.gate_up_proj.weight))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, self.rotary_emb) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        if residual is None:
            return self.norm(x)
        return self.norm.add_forward(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Also Qwen2ForCausalLM and Qwen3ForCausalLM (see the module docstring)."""

    packed_modules: dict[str, tuple[str, ...]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids [T], positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (the rows to sample from) -> logits [S, vocab] in the model's
        dtype (the sampler converts them to float32 where it needs more than their argmax)."""
        return torch.nn.functional.linear(hidden, self.lm_head.weight)

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def use_kernels(self, kernels: ModuleType | None) -> None:
        """Route norms, q/k-norm + RoPE + K/V store, SiLU-mul and small-batch projections
        through the Triton kernels of `kubellm.engine.kernels.triton_fused`, or back to plain
        torch with None."""
        for m in self.modules():
            if isinstance(m, (Linear, RMSNorm, SiluAndMul, LlamaAttention, LlamaMLP)):
                m.kernels = kernels

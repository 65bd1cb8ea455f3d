"""Triton kernels and their float32 torch references.

Nothing heavy is imported here. `reference` is pure torch (the CPU path and the tests' ground
truth). The Triton modules import triton and are only imported when the Triton backend is
chosen (`choice.resolve_attention_backend`), so CPU machines and CI never need triton:
- `triton_paged`: the K/V store and split-K GQA decode attention;
- `triton_prefill`: varlen paged prefill attention over prefix-cached contexts;
- `triton_fused`: RMSNorm (+ residual), q/k norm + RoPE + K/V store, SiLU-and-mul.
"""

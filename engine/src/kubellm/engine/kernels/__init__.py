"""Paged-attention kernels: Triton kernels and their float32 torch references.

Nothing heavy is imported here. `reference` is pure torch (the CPU path and the tests' ground
truth); `triton_paged` imports triton and is only imported when the Triton backend is chosen
(`choice.resolve_attention_backend`), so CPU machines and CI never need triton.
"""

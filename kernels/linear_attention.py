"""Triton kernels for causal linear attention (placeholder until the triton backend lands; registers nothing)."""

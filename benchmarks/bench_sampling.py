"""Sampling with top_k=50, top_p=0.9: every available backend against the sort-based reference and against the
Hugging Face warpers (transformers' TopKLogitsWarper(50), then TopPLogitsWarper(0.9), then torch.multinomial over
the softmax), on the same float32 logits.

CPU (`make bench`) and CUDA (`make bench-gpu`): B in {1, 64}, V in {32000, 128000, 256000}; logits are N(0, 2^2),
so the top-50 cut binds and top-p then keeps part of the 50. "x HF" is the warpers' time over the backend's.
"""
import pytest
import torch

import fastml

SHAPES = [(B, V) for B in (1, 64) for V in (32000, 128000, 256000)]
TOP_K, TOP_P = 50, 0.9
_HF_MS = {}


def _hf():
    """The Hugging Face warpers as generate() runs them, or None when transformers is missing."""
    try:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    except ImportError:
        return None
    top_k, top_p = TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)

    def run(logits, generator):
        scores = top_p(None, top_k(None, logits))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]

    return run


def _available(backend, device):
    from fastml import _backend

    try:
        _backend.select("sample", _backend.Call(torch.device(device), torch.float32), backend)
    except fastml.BackendUnavailable as exc:
        return str(exc)
    return None


def _cases(device):
    backends = ["hf", "reference", "triton"] if device == "cuda" else ["hf", "reference", "cpp"]
    return [(s, b) for s in SHAPES for b in backends]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--device"))
        metafunc.parametrize("case", cases, ids=[f"{c[1]}-B{c[0][0]}-V{c[0][1]}" for c in cases])


def test_sampling(benchmark, case, device, results):
    from runner import time_ms

    (B, V), backend = case
    if backend == "hf":
        hf = _hf()
        if hf is None:
            pytest.skip("transformers is not installed")
    else:
        reason = _available(backend, device)
        if reason:
            pytest.skip(reason)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, V, device=device, generator=g) * 2

    if backend == "hf":
        def fn():
            return hf(logits, g)
    else:
        def fn():
            return fastml.sample(logits, top_k=TOP_K, top_p=TOP_P, generator=g, backend=backend)

    slow = backend == "reference" and B * V >= 64 * 128000
    ms = time_ms(benchmark, fn, device, rounds=3 if slow else 7)
    key = (B, V)
    if backend == "hf":
        _HF_MS[key] = ms
    hf_ms = _HF_MS.get(key)
    results.add(f"sample top_k=50 top_p=0.9 ({device})",
                {"shape": f"B{B} V{V}", "dtype": "float32", "backend": backend, "ms": ms,
                 "x HF": (hf_ms / ms) if hf_ms else ""})

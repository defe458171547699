"""softmax_kl against eager PyTorch written the usual way:
F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="batchmean").

CPU (`make bench`): N=8192 rows of C=1000 classes, float32; CUDA: N=32768, C=32000, bfloat16. "fwd+bwd" takes
gradients to both logits. "saved MB" is what the autograd graph keeps for the backward (unique storages, including
the fused gradients the kernels write in the forward), "beyond inputs MB" the part that is not p or q themselves.
"""
import torch
import torch.nn.functional as F

import fastml
from bench_gaussian import saved_mb

CPU_SHAPE, GPU_SHAPE = (8192, 1000), (32768, 32000)
_EAGER_MS = {}


def eager(p, q):
    return F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="batchmean")


def _cases(device):
    backends = ["eager", "reference", "triton"] if device == "cuda" else ["eager", "reference", "cpp"]
    return [(p, b) for p in ("fwd", "fwd+bwd") for b in backends]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--device"))
        metafunc.parametrize("case", cases, ids=[f"{c[0]}-{c[1]}" for c in cases])


def test_softmax_kl(benchmark, case, device, results):
    from runner import time_ms

    kind, backend = case
    N, C = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    leaves = [(torch.randn(N, C, device=device, dtype=dtype, generator=g) * 2).requires_grad_(kind == "fwd+bwd")
              for _ in range(2)]

    def forward():
        if backend == "eager":
            return eager(*leaves)
        return fastml.softmax_kl(*leaves, backend=backend)

    def fn():
        with torch.set_grad_enabled(kind == "fwd+bwd"):
            loss = forward()
        if kind == "fwd+bwd":
            loss.backward()
            for t in leaves:
                t.grad = None

    ms = time_ms(benchmark, fn, device, rounds=5)
    if backend == "eager":
        _EAGER_MS[kind] = ms
    ref = _EAGER_MS.get(kind)
    row = {"shape": f"N{N} C{C}", "dtype": str(dtype).replace("torch.", ""), "pass": kind, "backend": backend,
           "ms": ms, "x eager": (ref / ms) if ref else ""}
    if kind == "fwd+bwd":
        total, beyond = saved_mb(forward, leaves)
        row.update({"saved MB": total, "beyond inputs MB": beyond})
    results.add(f"softmax_kl ({device})", row)

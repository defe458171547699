"""Self-terminating NLL: forward + backward of fastml.self_terminating_nll (mean over the tokens) at B=8, T=512,
V=32000, float32, for every backend this machine runs, against autograd of the reference (the log-probabilities
[B, T, V] formed in full, then gathered), all in one table.

CPU (`make bench`): reference and cpp (the triton interpreter is a test vehicle, not timed). CUDA
(`make bench-gpu`): reference and triton. GB/s counts the bytes a fused pass must move (the logits read once and
their gradient written once) against the copy bandwidth measured in this run where the suite measures it; peak
memory is what one call adds to a fresh process's VmHWM (CPU) or the CUDA allocator's peak over the inputs.
Nothing here asserts a speed.
"""
import pytest
import torch

import fastml

SHAPE = (8, 512, 32000)
EOS = 2
_REFERENCE_MS = {}

SETUP = """
import torch, fastml

def make_inputs(B, T, V, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, V, device=device, dtype=dtype, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (B, T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device) < lengths[:, None]
    return x, y, mask

def step(x, y, mask, backend):
    fastml.self_terminating_nll(x, y, EOS, mask=mask, backend=backend).backward()
    x.grad = None
""".replace("EOS", repr(EOS))
_NS = {}
exec(SETUP, _NS)


def _backends(device):
    return ["reference", "triton"] if device == "cuda" else ["reference", "cpp"]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backends(metafunc.config.getoption("--device")))


def _skip_unavailable(backend, device):
    from fastml import _backend

    try:
        _backend.select("self_terminating_nll", _backend.Call(torch.device(device), torch.float32), backend)
    except fastml.BackendUnavailable as exc:
        pytest.skip(str(exc))


def _peak(device, backend, x, y, mask):
    B, T, V = SHAPE
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _NS["step"](x, y, mask, backend)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from runner import peak_memory_mb

    return peak_memory_mb(SETUP + f"x, y, mask = make_inputs({B}, {T}, {V}, 'cpu')\n",
                          f"step(x, y, mask, {backend!r})")


def test_nll_fwd_bwd(benchmark, backend, device, results):
    from runner import time_ms

    _skip_unavailable(backend, device)
    B, T, V = SHAPE
    x, y, mask = _NS["make_inputs"](B, T, V, device)
    step = _NS["step"]
    step(x, y, mask, backend)   # warm-up
    ms = time_ms(benchmark, lambda: step(x, y, mask, backend), device, rounds=3)
    if backend == "reference":
        _REFERENCE_MS[device] = ms
    ref = _REFERENCE_MS.get(device)
    gbps = 2 * B * T * V * 4 / ms / 1e6
    row = {"shape": f"B{B} T{T} V{V}", "pass": "fwd+bwd", "backend": backend, "ms": ms,
           "x ref": (ref / ms) if ref else "", "GB/s": gbps}
    if device == "cuda" and results.machine.get("copy GB/s"):
        row["% copy BW"] = 100 * gbps / results.machine["copy GB/s"]
    row["peak MB"] = _peak(device, backend, x, y, mask)
    results.add(f"self-terminating NLL, fwd+bwd, float32 ({device})", row)

"""Logit-adjusted cross-entropy: fastml's fused loss and chunked linear head against torch on the same maths.

Loss (forward + backward of the mean loss, float32): N=8192 with C in {10, 1000, 32000}, and N=262144 with C=10.
Each shape: torch eager on the adjusted logits (F.cross_entropy(logits + tau * log_prior, target)), torch.compile
of that same function, and fastml's backends (cpp on CPU; triton on CUDA). GB/s counts the bytes a fused pass
must move (the logits read once, their gradient written once) and is given as a fraction of the copy bandwidth
measured in this run (bytes read plus written by a large tensor copy).
Linear head (N=8192, D=1024, C=32000, float32, forward + backward, mean): torch unfused (F.linear, then the loss
on the [N, C] logits), torch.compile of it, and fastml's chunked head; GFLOP/s counts the three GEMMs
(3 * 2 * N * C * D) against the sgemm peak measured in this run.
Peak memory: what one forward + backward adds to the VmHWM of a fresh process (CPU; torch.compile's figure
includes compiling, its first call), or the CUDA allocator's peak over the inputs. Nothing here asserts a speed.
"""
import time

import pytest
import torch

import fastml

LOSS_SHAPES = [(8192, 10), (8192, 1000), (8192, 32000), (262144, 10)]
HEAD_SHAPE = (8192, 1024, 32000)
TAU = 1.0

SETUP = """
import torch, fastml
import torch.nn.functional as F

def make_loss_inputs(N, C, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, device=device, dtype=dtype, generator=g).requires_grad_(True)
    t = torch.randint(0, C, (N,), device=device, generator=g)
    counts = torch.randint(1, 1000, (C,), device=device, generator=g)
    lp = (counts.double() / counts.sum()).log().to(device)
    return x, t, lp

def make_head_inputs(N, D, C, device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    w = (torch.randn(C, D, device=device, dtype=dtype, generator=g) / D ** 0.5).requires_grad_(True)
    t = torch.randint(0, C, (N,), device=device, generator=g)
    counts = torch.randint(1, 1000, (C,), device=device, generator=g)
    lp = (counts.double() / counts.sum()).log().to(device)
    return h, w, t, lp

def torch_loss(x, t, lp):
    return F.cross_entropy(x + TAU * lp.to(x.dtype), t)

def torch_head(h, w, t, lp):
    return F.cross_entropy(F.linear(h, w) + TAU * lp.to(h.dtype), t)

def loss_fn(variant):
    if variant == "torch eager":
        return torch_loss
    if variant == "torch.compile":
        return torch.compile(torch_loss)
    return lambda x, t, lp: fastml.logit_adjusted_cross_entropy(x, t, log_prior=lp, tau=TAU, backend=variant)

def head_fn(variant):
    if variant == "torch eager":
        return torch_head
    if variant == "torch.compile":
        return torch.compile(torch_head)
    return lambda h, w, t, lp: fastml.linear_logit_adjusted_cross_entropy(h, w, t, log_prior=lp, tau=TAU,
                                                                        backend=variant)

def step(fn, *args):
    fn(*args).backward()
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None
""".replace("TAU", repr(TAU))
_NS = {}
exec(SETUP, _NS)


def cpu_copy_gbps(n_bytes=1 << 28, repeats=7):
    """CPU copy bandwidth in GB/s, counting the bytes read and the bytes written: the best of `repeats` copies of
    a 256 MB float32 tensor into a tensor already touched (so no page faults are counted), on all threads."""
    x = torch.ones(n_bytes // 4)
    y = torch.zeros_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


@pytest.fixture(scope="module")
def copy_gbps(device, results):
    """The copy bandwidth of this run (CPU: measured here; CUDA: the suite's device-to-device figure)."""
    if device == "cuda":
        return results.machine.get("copy GB/s")
    value = cpu_copy_gbps()
    # Kept under its own key: the suite re-measures "copy GB/s" with the CUDA routine at the end of a run.
    results.record_peak("cpu copy GB/s", value)
    return results.machine["cpu copy GB/s"]


def _variants(device):
    return ["torch eager", "torch.compile", "triton" if device == "cuda" else "cpp"]


def _skip_unavailable(variant, op, device):
    if variant.startswith("torch"):
        return
    from fastml import _backend

    try:
        _backend.select(op, _backend.Call(torch.device(device), torch.float32), variant)
    except fastml.BackendUnavailable as exc:
        pytest.skip(str(exc))


def _time(benchmark, fn, device, rounds):
    from runner import time_ms

    return time_ms(benchmark, fn, device, rounds=rounds)


def _peak(device, setup_call, run_call, fn_args):
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn, args = fn_args
        _NS["step"](fn, *args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from runner import peak_memory_mb

    # The measured call is the process's first: torch.compile's includes compiling its graph.
    return peak_memory_mb(SETUP + setup_call, run_call)


def pytest_generate_tests(metafunc):
    device = metafunc.config.getoption("--device")
    if "loss_case" in metafunc.fixturenames:
        cases = [(s, v) for s in LOSS_SHAPES for v in _variants(device)]
        metafunc.parametrize("loss_case", cases, ids=[f"N{s[0]}-C{s[1]}-{v}" for s, v in cases])
    if "head_variant" in metafunc.fixturenames:
        metafunc.parametrize("head_variant", _variants(device))


_EAGER_MS = {}


def test_loss(benchmark, loss_case, device, results, copy_gbps):
    (N, C), variant = loss_case
    _skip_unavailable(variant, "logit_adjusted_cross_entropy", device)
    x, t, lp = _NS["make_loss_inputs"](N, C, device)
    fn = _NS["loss_fn"](variant)
    step = _NS["step"]
    step(fn, x, t, lp)  # warm-up (compiles torch.compile's graph)
    ms = _time(benchmark, lambda: step(fn, x, t, lp), device, rounds=3 if N * C >= 1 << 27 else 7)
    key = (N, C)
    if variant == "torch eager":
        _EAGER_MS[key] = ms
    eager = _EAGER_MS.get(key)
    gbps = 2 * N * C * 4 / ms / 1e6
    setup = f"x, t, lp = make_loss_inputs({N}, {C}, 'cpu')\nfn = loss_fn({variant!r})\n"
    row = {"shape": f"N{N} C{C}", "variant": variant, "ms": ms, "x eager": (eager / ms) if eager else "",
           "GB/s": gbps}
    if copy_gbps:
        row["% copy BW"] = 100 * gbps / copy_gbps
    row["peak MB"] = _peak(device, setup, "step(fn, x, t, lp)", (fn, (x, t, lp)))
    results.add(f"logit-adjusted cross-entropy, fwd+bwd, float32 ({device})", row)


def test_linear_head(benchmark, head_variant, device, results):
    variant = head_variant
    _skip_unavailable(variant, "linear_logit_adjusted_cross_entropy", device)
    N, D, C = HEAD_SHAPE
    h, w, t, lp = _NS["make_head_inputs"](N, D, C, device)
    fn = _NS["head_fn"](variant)
    step = _NS["step"]
    step(fn, h, w, t, lp)
    ms = _time(benchmark, lambda: step(fn, h, w, t, lp), device, rounds=3)
    if variant == "torch eager":
        _EAGER_MS["head"] = ms
    eager = _EAGER_MS.get("head")
    setup = f"h, w, t, lp = make_head_inputs({N}, {D}, {C}, 'cpu')\nfn = head_fn({variant!r})\n"
    peak = _peak(device, setup, "step(fn, h, w, t, lp)", (fn, (h, w, t, lp)))
    if variant == "torch eager":
        _EAGER_MS["head peak"] = peak
    row = {"shape": f"N{N} D{D} C{C}", "variant": variant, "ms": ms, "x eager": (eager / ms) if eager else "",
           "GFLOP/s": 3 * 2 * N * C * D / ms / 1e6, "peak MB": peak}
    if _EAGER_MS.get("head peak"):
        row["peak / eager's"] = peak / _EAGER_MS["head peak"]
    results.add(f"linear head + logit-adjusted cross-entropy, fwd+bwd, float32 ({device})", row)

"""Causal linear attention: every available backend against the reference (and peers where installed).

CPU (`make bench`): B=2, H=8, T in {512, 2048, 8192, 32768}, K=V=64, float32, normalize=False (the reference is
left out at T=32768: seconds per call); effective GFLOP/s count the recurrence's 4*T*K*V per head for the forward
and three times that for forward+backward, as a fraction of the sgemm peak measured in this run; peak memory is
what one call adds to a fresh process's VmHWM; a kernel row's median is over as many calls as take 2 s. One
sequence and one head at T=65536 (B1 H1, K=V=64) runs on 1 and on 2 threads: the speed-up of the cpp kernels'
split of one unit over threads (column groups in the forward, segments in the backward), next to the machine's
ceiling for the same work in the same rounds: B1 H2, two units that need no split, on 1 and 2 threads. The
length-scaling rows time the cpp kernels at T = 2048, 8192 and 32768 in turn, round by round, for their rates
relative to T=2048's under the same conditions.
CUDA (`make bench-gpu`): flash-linear-attention's published shapes in bfloat16; GB/s against the copy bandwidth
measured in this run (bytes: q, k, v read and o written; the backward adds o, do read and dq, dk, dv written).
"""
import functools
import importlib.util

import pytest
import torch

import fastml

CPU_SHAPES = [(2, 8, 512, 64, 64), (2, 8, 2048, 64, 64), (2, 8, 8192, 64, 64), (2, 8, 32768, 64, 64)]
CPU_REFERENCE_MAX_T = 8192
THREADS_SHAPE = (1, 1, 65536, 64, 64)
CPU_KERNEL_SECONDS = 2.0  # per row of the main table's cpp kernels
THREADS_SECONDS = 12.0  # per pass: long enough to span several of the machine's slow and fast spells
GPU_SHAPES = [(4, 64, 4096, 128, 128), (8, 32, 2048, 256, 256), (2, 16, 16384, 128, 128)]
MEMORY_SHAPE = (1, 8, 32768, 64, 64)
_REFERENCE_MS = {}


def _available(backend, device, dtype, K, V):
    from fastml import _backend

    try:
        _backend.select("causal_linear_attention",
                        _backend.Call(torch.device(device), dtype, {"K": K, "V": V}), backend)
    except fastml.BackendUnavailable as exc:
        return str(exc)
    return None


def _fla_chunk():
    """flash-linear-attention's chunked kernel, a peer, when installed (GPU only)."""
    if importlib.util.find_spec("fla") is None:
        return None
    from fla.ops.linear_attn import chunk_linear_attn

    def run(q, k, v, normalize):
        # fla takes [B, T, H, K] (the caller lays the inputs out so); its normalize divides by the running key sum.
        o, _ = chunk_linear_attn(q, k, v, scale=1.0, normalize=normalize)
        return o

    return run


def _case(device):
    if device == "cuda":
        backends = ["reference", "triton", "cuda", "fla"]
        return [(s, b, p, n) for s in GPU_SHAPES for n in (False, True) for p in ("fwd", "fwd+bwd")
                for b in backends]
    return [(s, b, p, False) for s in CPU_SHAPES for p in ("fwd", "fwd+bwd") for b in ("reference", "cpp")
            if b != "reference" or s[2] <= CPU_REFERENCE_MAX_T]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = metafunc.config.getoption("--device")
        cases = _case(device)
        metafunc.parametrize("case", cases, ids=[f"{c[2]}-{c[1]}-T{c[0][2]}-K{c[0][3]}-norm{int(c[3])}"
                                                 for c in cases])


def test_linear_attention(benchmark, case, device, results):
    (B, H, T, K, V), backend, kind, normalize = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fla = _fla_chunk() if backend == "fla" else None
    if backend == "fla" and fla is None:
        pytest.skip("flash-linear-attention is not installed")
    if backend != "fla":
        reason = _available(backend, device, dtype, K, V)
        if reason:
            pytest.skip(reason)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, generator=g) * 0.3 for d in (K, K, V))
    fmap = "elu+1" if normalize else None
    if backend == "fla":
        if normalize:
            q, k = (torch.nn.functional.elu(t) + 1 for t in (q, k))
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        fmap = None

    def forward(q, k, v):
        if fla is not None:
            return fla(q, k, v, normalize)
        return fastml.causal_linear_attention(q, k, v, feature_map=fmap, normalize=normalize, backend=backend)

    if kind == "fwd":
        def fn():
            with torch.no_grad():
                return forward(q, k, v)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        do = torch.randn(v.shape, device=device, dtype=dtype, generator=g)

        def fn():
            o = forward(*leaves)
            torch.autograd.backward(o, do)
            for t in leaves:
                t.grad = None

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = _time(benchmark, fn, device, T, backend)
    flops = _flops(B, H, T, K, V, kind)
    key = ((B, H, T, K, V), kind, normalize)
    if backend == "reference":
        _REFERENCE_MS[key] = ms
    ref = _REFERENCE_MS.get(key)
    row = {"shape": f"B{B} H{H} T{T} K{K} V{V}", "pass": kind, "backend": backend, "ms": ms,
           "x ref": (ref / ms) if ref else ""}
    if device == "cuda":
        el = dtype.itemsize
        nbytes = (B * H * T * (2 * K + 2 * V)) * el * (1 if kind == "fwd" else 3)
        row.update({"normalize": normalize, "TFLOP/s": flops / ms / 1e9, "GB/s": nbytes / ms / 1e6,
                    "peak MB": (torch.cuda.max_memory_allocated() - base) / 2**20})
    else:
        gflops = flops / ms / 1e6
        row.update({"GFLOP/s": gflops, "peak MB": _peak_mb(B, H, T, K, V, backend, kind)})
    results.add(f"causal_linear_attention ({device})", row)


def _time(benchmark, fn, device, T, backend=None):
    from runner import time_ms

    if device == "cpu" and backend != "reference":
        return time_ms(benchmark, fn, device, rounds=7, seconds=CPU_KERNEL_SECONDS)
    # The reference takes seconds per call at long T.
    slow = T >= 8192 and backend == "reference" or T >= 32768
    return time_ms(benchmark, fn, device, rounds=3 if slow else 7)


def _flops(B, H, T, K, V, kind):
    """The recurrence's effective flops: 4*T*K*V per head for the forward, three times that for fwd+bwd."""
    return 4 * T * K * V * B * H * (3 if kind == "fwd+bwd" else 1)


SCALING_T = (2048, 8192, 32768)


def _cpp_call(leaves, do, kind):
    """One cpp call of the interleaved rows: the forward, or forward and backward (gradients then dropped)."""
    with torch.set_grad_enabled(kind == "fwd+bwd"):
        o = fastml.causal_linear_attention(*leaves, normalize=False, backend="cpp")
    if kind == "fwd+bwd":
        torch.autograd.backward(o, do)
        for t in leaves:
            t.grad = None


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_linear_attention_t_scaling(benchmark, kind, device, results):
    """The cpp kernels' rate at B2 H8 K=V=64 for T = 2048, 8192 and 32768, the three lengths called in turn (10
    rounds after a warm-up, medians), so that the ratio to T=2048's rate is taken under the same conditions of a
    shared machine (the main table times one row after another, minutes apart)."""
    if device != "cpu":
        pytest.skip("the length scaling rows are a CPU measurement")
    reason = _available("cpp", device, torch.float32, 64, 64)
    if reason:
        pytest.skip(reason)
    from runner import interleaved_ms

    g = torch.Generator().manual_seed(0)
    fns = {}
    for T in SCALING_T:
        leaves = [(torch.randn(2, 8, T, 64, generator=g) * 0.3).requires_grad_(kind == "fwd+bwd") for _ in range(3)]
        do = torch.randn(2, 8, T, 64, generator=g)
        fns[T] = functools.partial(_cpp_call, leaves, do, kind)
    med = interleaved_ms(fns, rounds=10)
    benchmark.pedantic(lambda: None, rounds=1)
    rate = {T: _flops(2, 8, T, 64, 64, kind) / med[T] / 1e6 for T in SCALING_T}
    for T in SCALING_T:
        results.add("causal_linear_attention length scaling (cpu, cpp, interleaved)",
                    {"shape": f"B2 H8 T{T} K64 V64", "pass": kind, "ms": med[T],
                     "GFLOP/s": rate[T], "x T=2048 rate": rate[T] / rate[2048]})


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_linear_attention_threads(benchmark, kind, device, results):
    """B1 H1 T65536: one (sequence, head) unit, which only the split of a unit (columns, segments) spreads over
    threads. The machine's own ceiling for the same work: B1 H2 (two units, one per thread, no split) on 1 and 2
    threads. Each round calls the split on 1 then 2 threads, then the ceiling on 1 then 2 threads, so that all four
    see the same conditions of a shared machine, whose speed changes from second to second (neighbours on the
    host); rounds after a warm-up until THREADS_SECONDS have passed (at least 30), medians."""
    if device != "cpu":
        pytest.skip("the thread scaling is a CPU measurement")
    reason = _available("cpp", device, torch.float32, THREADS_SHAPE[3], THREADS_SHAPE[4])
    if reason:
        pytest.skip(reason)
    from runner import interleaved_ms

    B, H, T, K, V = THREADS_SHAPE
    g = torch.Generator().manual_seed(0)
    fns = {}
    for heads in (H, 2 * H):
        leaves = [(torch.randn(B, heads, T, d, generator=g) * 0.3).requires_grad_(kind == "fwd+bwd")
                  for d in (K, K, V)]
        fns[heads] = functools.partial(_cpp_call, leaves, torch.randn(B, heads, T, V, generator=g), kind)
    calls = {(heads, threads): fn for heads, fn in fns.items() for threads in (1, 2)}
    before = torch.get_num_threads()
    try:
        med = interleaved_ms(calls, rounds=30, seconds=THREADS_SECONDS,
                             prepare=lambda key: torch.set_num_threads(key[1]))
    finally:
        torch.set_num_threads(before)
    benchmark.pedantic(lambda: None, rounds=1)
    ceiling = med[2 * H, 1] / med[2 * H, 2]
    for threads in (1, 2):
        gflops = _flops(B, H, T, K, V, kind) / med[H, threads] / 1e6
        speedup = med[H, 1] / med[H, threads]
        results.add("causal_linear_attention threads (cpu)",
                    {"shape": f"B{B} H{H} T{T} K{K} V{V}", "pass": kind, "backend": "cpp", "threads": threads,
                     "ms": med[H, threads], "GFLOP/s": gflops, "x 1 thread": speedup,
                     "ceiling (H2) x 1 thread": ceiling if threads == 2 else "",
                     "% of ceiling": 100 * speedup / ceiling if threads == 2 else ""})


def _peak_mb(B, H, T, K, V, backend, kind):
    from runner import peak_memory_mb

    setup = (f"q, k, v = (torch.randn({B}, {H}, {T}, d) for d in ({K}, {K}, {V}))\n"
             f"leaves = [t.requires_grad_({kind == 'fwd+bwd'}) for t in (q, k, v)]")
    call = (f"o = fastml.causal_linear_attention(*leaves, normalize=False, backend={backend!r})\n"
            f"o.sum().backward() if o.requires_grad else None")
    return peak_memory_mb(setup, call)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_linear_attention_memory(benchmark, backend, device, results):
    """Peak memory of a forward at B=1, H=8, T=32768, K=V=64 float32 (fresh process, VmHWM)."""
    if device != "cpu":
        pytest.skip("the memory check is a CPU measurement")
    B, H, T, K, V = MEMORY_SHAPE
    benchmark.pedantic(lambda: None, rounds=1)
    mb = _peak_mb(B, H, T, K, V, backend, "fwd")
    results.add("causal_linear_attention peak memory (cpu, forward)",
                {"shape": f"B{B} H{H} T{T} K{K} V{V}", "backend": backend, "peak MB": mb})

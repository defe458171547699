"""Kernel safety at scale and builds that run where they are installed:

- launch grids: the batch-sized count (examples, sequences x heads) on grid axis 0, which takes 2^31 - 1 programs,
  never on axes 1 and 2, which stop at 65535 on CUDA; a real 70,000-example IG run through the Triton kernels;
- cu_seqlens under torch.compile: bad offsets are an error from every kernel op (called directly, and through a
  fullgraph-compiled causal_linear_attention, which skips the Python-side checks), and the Triton kernels clamp
  each segment to [0, T] so that an unchecked bad value cannot reach outside the tensors;
- the shared memory the CUDA kernels ask for (fastml/ops/linear_attention/_cuda_limits.py), against a hand count;
- the CPU vector width follows the compiler's target (csrc/common.h), and the portable build (`make cpu-portable`)
  has no AVX-512 instruction and computes the same results.
"""
import importlib
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import fastml
from fastml._ext import load_error
from fastml.ops.linear_attention._cuda_limits import cuda_smem_bytes, cuda_smem_reason, scan_smem_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

def _kernels(name):
    try:
        return importlib.import_module(f"fastml.kernels.{name}")
    except ImportError as exc:  # no triton
        pytest.skip(f"the Triton kernels are not available: {exc}")


# ---- launch grids ----


class GridRecorder:
    """Stands in for a Triton kernel: records each launch's grid (resolved with the smallest tiles a config may
    have, which gives the most programs) instead of running it."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {"BT": 16, "BK": 16, "BV": 16, **kwargs}
            self.grids.append(tuple(grid(meta) if callable(grid) else grid))

        return launch


def assert_fits_cuda_grid(grid, programs):
    """grid is a launch CUDA accepts, with at least `programs` programs."""
    assert 1 <= len(grid) <= 3, grid
    assert grid[0] <= MAX_GRID_X, f"axis 0 of {grid} beyond {MAX_GRID_X}"
    for n in grid[1:]:
        assert n <= MAX_GRID_YZ, f"grid {grid}: axes 1 and 2 take at most {MAX_GRID_YZ} programs on CUDA"
    total = 1
    for n in grid:
        total *= n
    assert total >= programs, grid


BIG = 70_000  # more than the 65,535 programs grid axes 1 and 2 take


@pytest.mark.parametrize("B,H", [(BIG, 1), (700, 100)])
def test_linear_attention_grids_put_batch_on_axis_0(monkeypatch, B, H):
    la = _kernels("linear_attention")
    la_bwd = _kernels("linear_attention_bwd")
    rec = {name: GridRecorder() for name in ("fwd", "step", "dq", "dkv")}
    monkeypatch.setattr(la, "_fwd_kernel", rec["fwd"])
    monkeypatch.setattr(la, "_step_kernel", rec["step"])
    monkeypatch.setattr(la_bwd, "_dq_kernel", rec["dq"])
    monkeypatch.setattr(la_bwd, "_dkv_kernel", rec["dkv"])
    K = V = 1
    q = torch.zeros(B, H, 1, K)
    v = torch.zeros(B, H, 1, V)
    o, kv, z, den = la.linear_attention_fwd_triton(q, q, v, None, None, None, 0, True, 1e-6, 1.0)
    la.linear_attention_bwd_triton(o, None, None, q, q, v, o, den, None, None, None, 0, True, 1e-6, 1.0)
    la.linear_attention_step_triton(q[:, :, 0], q[:, :, 0], v[:, :, 0], kv, z, 0, True, 1e-6, 1.0)
    # Wide heads: several value / key tiles on axis 1.
    q256, v256 = torch.zeros(2, 3, 1, 256), torch.zeros(2, 3, 1, 256)
    la.linear_attention_fwd_triton(q256, q256, v256, None, None, None, 0, True, 1e-6, 1.0)
    for name, r in rec.items():
        assert r.grids, f"the {name} kernel was not launched"
        assert_fits_cuda_grid(r.grids[0], B * H)
        assert r.grids[0][0] >= B * H, f"{name}: sequences x heads not on axis 0: {r.grids[0]}"
    assert rec["fwd"].grids[1][0] == 6 and rec["fwd"].grids[1][1] > 1


def test_ig_grids_fit_cuda_limits(monkeypatch):
    ig = _kernels("integrated_gradients")
    rec = {name: GridRecorder() for name in ("scale", "acc")}
    monkeypatch.setattr(ig, "_scale_kernel", rec["scale"])
    monkeypatch.setattr(ig, "_accumulate_kernel", rec["acc"])
    # (steps, examples, elements per example): many steps (walked inside each program of the scale kernel), many
    # examples, and large examples.
    for S, B, D in ((BIG, 1, 1), (2, BIG, 1), (2, BIG, 5), (2, 3, 5000)):
        x = torch.zeros(B, D)
        ig.ig_scale_inputs_triton(x, x, torch.zeros(S))
        ig.ig_accumulate_triton(torch.zeros(S * B, D), x, x, torch.zeros(S), True, None)
        for name in rec:
            grid = rec[name].grids[-1]
            assert len(grid) == 1, f"{name}: the whole count belongs on axis 0, got {grid}"
            assert_fits_cuda_grid(grid, 1)
        # Every element of every example is covered: the programs x their tile of 1024 elements.
        assert rec["acc"].grids[-1][0] * 1024 >= B * D
        assert rec["scale"].grids[-1][0] * 1024 >= B * D


def test_ig_70000_examples_triton_matches_formula():
    """A real launch over 70,000 one-element examples (too many for grid axis 1), against the formulas."""
    _kernels("integrated_gradients")
    g = torch.Generator().manual_seed(0)
    B, S = BIG, 3
    x = torch.randn(B, 1, generator=g)
    xb = torch.randn(B, 1, generator=g)
    alphas = torch.tensor([0.1, 0.5, 0.9])
    weights = torch.tensor([0.25, 0.5, 0.25])
    scaled = torch.ops.fastml.ig_scale_inputs_triton(x, xb, alphas)
    want = (xb + alphas.view(S, 1, 1) * (x - xb)).reshape(S * B, 1)
    torch.testing.assert_close(scaled, want)
    grads = torch.randn(S * B, 1, generator=g)
    acc = torch.randn(B, 1, generator=g)
    attr, sums = torch.ops.fastml.ig_accumulate_triton(grads, x, xb, weights, True, acc)
    total = acc.double() + (weights.double().view(S, 1, 1) * grads.double().view(S, B, 1)).sum(0)
    want_attr = total * (x.double() - xb.double())
    torch.testing.assert_close(attr.double(), want_attr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), want_attr.sum(1), rtol=1e-5, atol=1e-6)


def test_ig_70000_examples_triton_backend_matches_reference():
    _kernels("integrated_gradients")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BIG, 1, generator=g)
    w = torch.randn(1, generator=g)

    def model(inp):
        return torch.tanh(inp * w).sum(1)

    kw = dict(n_steps=4, method="gausslegendre", return_convergence_delta=True)
    got, d_got = fastml.integrated_gradients(model, x, backend="triton", **kw)
    want, d_want = fastml.integrated_gradients(model, x, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_got, d_want, rtol=1e-5, atol=1e-5)


# ---- cu_seqlens values ----

T = 8
BAD_CU = {
    "first not 0": [1, 5, 8],
    "negative": [0, -2, 8],
    "decreasing": [0, 6, 3, 8],
    "last below T": [0, 3, 7],
    "last beyond T": [0, 3, 9],
    "far beyond T": [0, 5, 10**9],
}


def _qkv(seed=0, H=2, K=4, V=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, T, K, generator=g), torch.randn(1, H, T, K, generator=g),
            torch.randn(1, H, T, V, generator=g))


def _kernel_ops(backend):
    if backend == "triton":
        _kernels("linear_attention")
        return torch.ops.fastml.linear_attention_fwd_triton, torch.ops.fastml.linear_attention_bwd_triton
    if load_error() is not None:
        pytest.skip(load_error())
    return torch.ops.fastml.linear_attention_fwd, torch.ops.fastml.linear_attention_bwd


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", sorted(BAD_CU))
def test_kernel_ops_reject_bad_cu_seqlens(backend, case):
    fwd, bwd = _kernel_ops(backend)
    q, k, v = _qkv()
    good = torch.tensor([0, 5, 8])
    o, kv, z, den = fwd(q, k, v, None, None, good, 1, True, 1e-6, 1.0)
    bad = torch.tensor(BAD_CU[case])
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
        fwd(q, k, v, None, None, bad, 1, True, 1e-6, 1.0)
    if len(BAD_CU[case]) == 3:  # the backward's states are [N, ...] for N = 2 sequences
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
            bwd(torch.ones_like(o), None, None, q, k, v, o, den, None, None, bad, 1, True, 1e-6, 1.0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("bad", [torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([[0, 8]])],
                         ids=["int32", "2-D"])
def test_kernel_ops_reject_bad_cu_seqlens_layout(backend, bad):
    fwd, _ = _kernel_ops(backend)
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError, RuntimeError), match="cu_seqlens"):
        fwd(q, k, v, None, None, bad, 1, True, 1e-6, 1.0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", ["first not 0", "decreasing", "far beyond T"])
def test_compiled_causal_linear_attention_rejects_bad_cu_seqlens(backend, case):
    """torch.compile skips the Python-side checks of the values (they need a host read); the kernel ops check."""
    _kernel_ops(backend)
    torch._dynamo.reset()
    q, k, v = _qkv(seed=1)

    def f(q, k, v, cu):
        return fastml.causal_linear_attention(q, k, v, feature_map="elu+1", cu_seqlens=cu, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    good = torch.tensor([0, 3, 8])
    torch.testing.assert_close(compiled(q, k, v, good), f(q, k, v, good))
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
        compiled(q, k, v, torch.tensor(BAD_CU[case]))


@pytest.mark.parametrize("bad,clamped", [([0, 5, 100], [0, 5, 8]), ([-3, 5, 8], [0, 5, 8]), ([0, 9, 8], [0, 8, 8])])
def test_triton_kernels_clamp_segments(bad, clamped):
    """Past the op's argument check (the launchers unwrapped), a bad cu_seqlens reaches the kernels, which clamp
    every segment into [0, T] (bos into [0, T], eos into [bos, T]): they compute the clamped segments, nothing
    outside the tensors."""
    la = _kernels("linear_attention")
    fwd, bwd = la.linear_attention_fwd_triton.__wrapped__, la.linear_attention_bwd_triton.__wrapped__
    q, k, v = _qkv(seed=2)
    args = (None, None)
    opts = (1, True, 1e-6, 1.0)
    o, kv, z, den = fwd(q, k, v, *args, torch.tensor(bad), *opts)
    o_ref, kv_ref, z_ref, den_ref = fwd(q, k, v, *args, torch.tensor(clamped), *opts)
    # Rows no clamped segment covers are left unwritten; compare the covered ones.
    covered = torch.zeros(T, dtype=torch.bool)
    for a, b in zip(clamped, clamped[1:]):
        covered[a:b] = True
    torch.testing.assert_close(o[:, :, covered], o_ref[:, :, covered])
    torch.testing.assert_close(kv, kv_ref)
    torch.testing.assert_close(z, z_ref)
    go = torch.ones_like(o)
    got = bwd(go, None, None, q, k, v, o_ref, den_ref, None, None, torch.tensor(bad), *opts)
    want = bwd(go, None, None, q, k, v, o_ref, den_ref, None, None, torch.tensor(clamped), *opts)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a[:, :, covered], b[:, :, covered])
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b)


# ---- CUDA shared memory ----


def test_cuda_smem_bytes_by_hand():
    # float32: chunk C = 32, output tile BN = 64, one element of padding per row; regions rounded up to 128 B.
    # Forward at K = V = 64 (DK = 64): Qa, Ka 32 x 65 x 4 = 8320 each; Vb 32 x 65 x 4 = 8320; state 64 x 65 x 4
    # = 16640; scores 32 x 33 x 4 = 4224; output 32 x 65 x 4 = 8320; z 64 x 4 = 256; den, 1/den, -do.o 128 each.
    fwd = 8320 * 3 + 16640 + 4224 + 8320 + 256 + 3 * 128
    assert fwd == 54784
    assert scan_smem_bytes(64, torch.float32) == fwd
    # dq / dk at V = 64: DK = round_up(65, 16) = 80. Qa, Ka 32 x 81 x 4 = 10368; Vb 8320; state 80 x 65 x 4 =
    # 20800 -> 20864; scores 4224; output 8320; z 320 -> 384; 3 x 128.
    bwd = 10368 * 2 + 8320 + 20864 + 4224 + 8320 + 384 + 3 * 128
    assert scan_smem_bytes(80, torch.float32) == bwd == 63232
    assert cuda_smem_bytes(64, 64, torch.float32) == bwd
    # bfloat16, K = V = 128, dq / dk pass (DK = 144): C = BN = 64, 8 elements of padding (4 in float32 rows).
    # Qa, Ka 64 x 152 x 2 = 19456; Vb 64 x 72 x 2 = 9216; state 144 x 68 x 4 = 39168; its bf16 copy 144 x 72 x 2
    # = 20736; scores 64 x 68 x 4 = 17408 (the output tile reuses them); bf16 scores 64 x 72 x 2 = 9216;
    # z 144 x 4 = 576 -> 640; den, 1/den, -do.o 256 each.
    bf16 = 19456 * 2 + 9216 + 39168 + 20736 + 17408 + 9216 + 640 + 3 * 256
    assert bf16 == 136064
    assert cuda_smem_bytes(128, 128, torch.bfloat16) == bf16
    assert cuda_smem_bytes(128, 128, torch.float16) == bf16
    # The largest pass decides: a wide K makes the forward the larger one.
    assert cuda_smem_bytes(256, 16, torch.float32) == scan_smem_bytes(256, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        scan_smem_bytes(64, torch.int32)


def _fake_props(monkeypatch, **fields):
    props = types.SimpleNamespace(name="Fake GPU", **fields)
    calls = []

    def get(device):
        calls.append(device)
        return props

    monkeypatch.setattr(torch.cuda, "get_device_properties", get)
    return calls


def test_cuda_smem_reason(monkeypatch):
    calls = _fake_props(monkeypatch, shared_memory_per_block_optin=99 * 1024)  # sm_86 / sm_89
    assert cuda_smem_reason("cuda:0", 64, 64, torch.float32) is None
    reason = cuda_smem_reason("cuda:0", 128, 128, torch.bfloat16)
    assert reason is not None and "136064" in reason and str(99 * 1024) in reason and "Fake GPU" in reason
    assert calls == ["cuda:0", "cuda:0"]
    _fake_props(monkeypatch, shared_memory_per_block_optin=163 * 1024)  # A100
    assert cuda_smem_reason(0, 128, 128, torch.bfloat16) is None
    assert cuda_smem_reason(0, 256, 256, torch.bfloat16) is not None
    assert cuda_smem_reason(0, 256, 256, torch.float32) is None  # 163072 bytes: just fits
    _fake_props(monkeypatch)  # a torch whose properties lack the field: no verdict
    assert cuda_smem_reason(0, 256, 256, torch.bfloat16) is None


def test_cuda_limits_import_queries_no_device(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("queried a device at import time")

    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    import fastml.ops.linear_attention._cuda_limits as limits

    importlib.reload(limits)


# ---- CPU builds ----


def _cxx():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cxx() is None, reason="an x86-64 compiler")
@pytest.mark.parametrize("march,vec_bytes,regs", [("x86-64", 16, 16), ("x86-64-v2", 16, 16), ("x86-64-v3", 32, 16),
                                                  ("skylake-avx512", 64, 32)])
def test_vector_width_follows_target(tmp_path, march, vec_bytes, regs):
    """csrc/common.h sizes its vectors from the compiler's target macros, so a baseline build has no wider
    vector than the baseline's registers."""
    src = tmp_path / "probe.cpp"
    src.write_text(f'#include "common.h"\nstatic_assert(fastml::kVecBytes == {vec_bytes}, "width");\n'
                   f'static_assert(fastml::kVecRegs == {regs}, "registers");\nint main() {{ return 0; }}\n')
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    r = subprocess.run([_cxx(), "-std=c++20", f"-march={march}", "-fsyntax-only", "-I", os.path.join(ROOT, "csrc"),
                        "-I", inc, str(src)], capture_output=True, text=True)
    if "unrecognized" in r.stderr or "unknown" in r.stderr and "march" in r.stderr:
        pytest.skip(f"the compiler does not know -march={march}")
    assert r.returncode == 0, r.stderr[-2000:]


PORTABLE = os.environ.get("FASTML_PORTABLE_BUILD")


def _portable_so():
    folder = os.path.join(ROOT, PORTABLE, "fastml") if not os.path.isabs(PORTABLE) else os.path.join(PORTABLE,
                                                                                                     "fastml")
    found = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")] if os.path.isdir(folder) else []
    assert found, f"no fastml/_C*.so under {PORTABLE}: run `make cpu-portable`"
    return os.path.join(folder, found[0])


@pytest.mark.skipif(not PORTABLE, reason="set by `make cpu-portable` (FASTML_PORTABLE_BUILD=<its build dir>)")
def test_portable_build_has_no_avx512():
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _portable_so()], capture_output=True, text=True,
                         check=True).stdout
    assert "zmm" not in dis, "the portable build uses AVX-512 registers"


@pytest.mark.skipif(not PORTABLE, reason="set by `make cpu-portable` (FASTML_PORTABLE_BUILD=<its build dir>)")
def test_portable_build_loads_and_computes():
    """In a fresh process, fastml imported with the portable build as its fastml._C (put in sys.modules before
    fastml imports it): the cpp kernels give the reference's results."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        spec = importlib.util.spec_from_file_location("fastml._C", {_portable_so()!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastml._C"] = module
        import fastml
        assert sys.modules["fastml._C"] is module and fastml._ext.load_error() is None
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            q, k, v = (torch.randn(2, 3, 150, d, generator=g).to(dtype) for d in (40, 40, 72))
            o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend="cpp")
            r = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend="reference")
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(o.float(), r.float(), rtol=tol, atol=tol)
        x = torch.randn(5, 7, generator=g)
        a = fastml.integrated_gradients(lambda t: (t ** 3).sum(1), x, n_steps=8, backend="cpp")
        b = fastml.integrated_gradients(lambda t: (t ** 3).sum(1), x, n_steps=8, backend="reference")
        torch.testing.assert_close(a, b)
        print("portable ok", module.__file__)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "portable ok" in r.stdout

"""What the parametrized suites share: the backends this machine runs (`TARGETS`), one input maker per op, and
the check of a linear-attention backend against the float64 reference, and the runner of examples/ scripts."""
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import fastml
from fastml._numerics import acc_dtype
from fastml.testing import assert_close, assert_close_norm

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


class Target(NamedTuple):
    """A backend and the device of the tensors it is given."""

    backend: str
    device: str

    @property
    def kind(self):
        """Which shape set suits it: "gpu" (full size), "interp" (triton's interpreter: small) or "cpu"."""
        if self.device == "cuda":
            return "gpu"
        return "interp" if self.backend == "triton" else "cpu"

    def dtypes(self, op="linear_attention"):
        """The dtypes it serves for `op` ("linear_attention" or "ig"): triton's linear attention computes in
        float32 (no float64), and bfloat16 is left out of the interpreter (its tl.dot is wrong there)."""
        if self.backend != "triton":
            return (F32, F64, F16, BF16)
        if op == "ig":
            return (F32, F16, F64) if self.device == "cpu" else (F32, F16, F64, BF16)
        return (F32, F16) if self.device == "cpu" else (F32, F16, BF16)


def _targets():
    available = fastml.backends()
    out = [Target("reference", "cpu")]
    if available["cpp"][0]:
        out.append(Target("cpp", "cpu"))
    if available["triton"][0] and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(Target("triton", "cpu"))
    if torch.cuda.is_available():
        out += [Target(name, "cuda") for name in ("triton", "cuda") if available[name][0]]
    return out


_ALL = _targets()


def _param(target, *values):
    marks = [pytest.mark.gpu] if target.device == "cuda" else []
    ident = target.backend if target.device == "cpu" else f"{target.backend}-cuda"
    return pytest.param(target, *values, marks=marks, id="-".join([ident] + [_ident(v) for v in values]))


def _ident(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return "x".join(_ident(v) for v in value)
    return str(value)


def targets(*, kernels=False, dtype=None, device=None, op="linear_attention"):
    """pytest params of the targets (with `kernels`: no reference; with `dtype`: those that serve it for `op`;
    with `device`: those on it)."""
    return [_param(t) for t in _ALL if not (kernels and t.backend == "reference")
            and (dtype is None or dtype in t.dtypes(op)) and (device is None or t.device == device)]


TARGETS = targets()


def per_target(table, *, kernels=False, op="linear_attention"):
    """pytest params (target, *case) from {kind: [case, ...]}: each target gets its kind's cases whose dtype (the
    first torch.dtype in the case, if any) it serves for `op`."""
    out = []
    for t in _ALL:
        if kernels and t.backend == "reference":
            continue
        for case in table.get(t.kind, ()):
            case = case if isinstance(case, tuple) else (case,)
            dtypes = [v for v in case if isinstance(v, torch.dtype)]
            if dtypes and dtypes[0] not in t.dtypes(op):
                continue
            out.append(_param(t, *case))
    return out


# ---- causal linear attention ----


def la_ops(target):
    """(fwd, bwd, step) torch ops behind a kernel backend: cpp and cuda share the ops, dispatched by device."""
    suffix = "_triton" if target.backend == "triton" else ""
    return tuple(getattr(torch.ops.fastml, f"linear_attention_{n}{suffix}") for n in ("fwd", "bwd", "step"))


def la_inputs(B, H, T, K, V, dtype, device="cpu", *, with_state=False, n_seq=None, seed=0, nonnegative=False):
    """q, k, v [B, H, T, *] and an initial LinearAttentionState (or None) for N = n_seq (default B) sequences.

    nonnegative: |q|, |k|, for the identity map with normalize=True, whose q'.z can otherwise pass through zero
    and amplify rounding without bound (a real feature map's features are non-negative)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g) * 0.5
    k = torch.randn(B, H, T, K, generator=g) * 0.5
    v = torch.randn(B, H, T, V, generator=g)
    if nonnegative:
        q, k = q.abs(), k.abs()
    state = None
    if with_state:
        N = B if n_seq is None else n_seq
        sd = acc_dtype(dtype)
        # A plausible state: what non-negative features of a short prefix would give (z > 0 keeps the normalizer
        # away from zero).
        state = fastml.LinearAttentionState(torch.randn(N, H, K, V, generator=g).to(device, sd),
                                            (torch.rand(N, H, K, generator=g) * 4 + 1).to(device, sd))
    return [t.to(device, dtype) for t in (q, k, v)] + [state]


def la_run(backend, q, k, v, state, grad_seed=1, **opts):
    """Forward and backward through one backend; returns (o, kv, z, dq, dk, dv, dkv0, dz0)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    st = None
    if state is not None:
        st = fastml.LinearAttentionState(*(t.detach().clone().requires_grad_(True) for t in state))
    o, fs = fastml.causal_linear_attention(*leaves, initial_state=st, output_final_state=True, backend=backend,
                                           **opts)
    g = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
    gkv = torch.randn(fs.kv.shape, generator=g).to(o.device, fs.kv.dtype) * 0.1
    gz = torch.randn(fs.z.shape, generator=g).to(o.device, fs.z.dtype) * 0.1
    torch.autograd.backward([o, fs.kv, fs.z], [go, gkv, gz])
    grads = [t.grad for t in leaves]
    grads += [None, None] if st is None else [st.kv.grad, st.z.grad]
    return [o.detach(), fs.kv.detach(), fs.z.detach()] + grads


LA_NAMES = ["o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"]


def check_la_backend(target, q, k, v, state=None, **opts):
    """One call through `target` against the reference in float64 on the same (rounded) inputs: the output, the
    final state and every gradient (q, k, v and the initial state), with their dtypes."""
    got = la_run(target.backend, q, k, v, state, **opts)
    to64 = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    ref_state = None if state is None else fastml.LinearAttentionState(to64(state.kv), to64(state.z))
    cu = opts.pop("cu_seqlens", None)
    want = la_run("reference", to64(q), to64(k), to64(v), ref_state, cu_seqlens=None if cu is None else cu.cpu(),
                  **opts)
    short = q.shape[2] == 1
    for name, a, e in zip(LA_NAMES, got, want):
        if e is None:
            assert a is None, name
            continue
        assert a is not None, f"{name} has no gradient"
        want_dtype = acc_dtype(q.dtype) if name in ("kv", "z", "dkv0", "dz0") else q.dtype
        assert a.dtype == want_dtype, f"{name} has dtype {a.dtype}, expected {want_dtype}"
        label = f"{target.backend} {name}"
        if short or (name == "o" and opts.get("normalize", True) and opts.get("feature_map") is not None):
            # One token (no long sums), or a normalized output: a weighted mean of v rows with non-negative
            # weights, whose size does not grow with T. Element by element.
            assert_close(a, e, dtype=q.dtype, name=label)
        else:
            # The states and gradients (and an unnormalized output) are sums over up to T tokens that the
            # kernels add chunk by chunk, the reference token by token (or with other chunks): an element that
            # cancels to near zero carries the rounding of its larger terms. Norm-wise, each row on its own.
            assert_close_norm(a, e, dtype=q.dtype, dim=-1, name=label)
    return got


# ---- integrated-gradients path ----


def ig_inputs(shape, S, dtype, device="cpu", *, seed=0):
    """inputs, baselines [shape], alphas/weights [S] (accumulation dtype) and path gradients [S*B, ...]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    xb = torch.randn(shape, generator=g, dtype=F64) * 0.1
    alphas = torch.rand(S, generator=g, dtype=F64)
    grads = torch.randn((S * shape[0],) + tuple(shape[1:]), generator=g, dtype=F64)
    return (x.to(device, dtype), xb.to(device, dtype), alphas.to(device, acc_dtype(dtype)),
            grads.to(device, dtype))


# ---- examples/ ----

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, cwd):
    env = dict(os.environ)
    # The suite runs in parallel workers (pytest -n): one thread per example keeps them from oversubscribing cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(EXAMPLES.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout

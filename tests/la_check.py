"""Shared check for linear-attention backends: one call through `backend` against the float64 reference, on the
output, the final state and every gradient (q, k, v and the initial state)."""
import torch

import fastml
from fastml.testing import assert_close


def make_inputs(B, H, T, K, V, dtype, device="cpu", *, with_state=False, n_seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g) * 0.5
    k = torch.randn(B, H, T, K, generator=g) * 0.5
    v = torch.randn(B, H, T, V, generator=g)
    state = None
    if with_state:
        N = B if n_seq is None else n_seq
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        # A plausible state: what elu+1 features of a short prefix would give (z > 0 keeps the normalizer away
        # from zero).
        state = fastml.LinearAttentionState(torch.randn(N, H, K, V, generator=g).to(device, sd),
                                            (torch.rand(N, H, K, generator=g) * 4 + 1).to(device, sd))
    return [t.to(device, dtype) for t in (q, k, v)] + [state]


def run(fn_backend, q, k, v, state, grad_seed=1, **opts):
    """Forward and backward through one backend; returns (o, kv, z, dq, dk, dv, dkv0, dz0)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    st = None
    if state is not None:
        st = fastml.LinearAttentionState(*(t.detach().clone().requires_grad_(True) for t in state))
    o, fs = fastml.causal_linear_attention(*leaves, initial_state=st, output_final_state=True,
                                           backend=fn_backend, **opts)
    g = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
    gkv = torch.randn(fs.kv.shape, generator=g).to(o.device, fs.kv.dtype) * 0.1
    gz = torch.randn(fs.z.shape, generator=g).to(o.device, fs.z.dtype) * 0.1
    torch.autograd.backward([o, fs.kv, fs.z], [go, gkv, gz])
    grads = [t.grad for t in leaves]
    grads += [None, None] if st is None else [st.kv.grad, st.z.grad]
    return [o.detach(), fs.kv.detach(), fs.z.detach()] + grads


def check_backend(backend, q, k, v, state=None, *, dtype=None, rtol=None, atol=None, **opts):
    """Compare `backend` with the reference computed in float64 from the same (rounded) inputs."""
    got = run(backend, q, k, v, state, **opts)
    to64 = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    ref_state = None if state is None else fastml.LinearAttentionState(to64(state.kv), to64(state.z))
    cu = opts.pop("cu_seqlens", None)
    want = run("reference", to64(q), to64(k), to64(v), ref_state,
               cu_seqlens=None if cu is None else cu.cpu(), **opts)
    names = ["o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"]
    dtype = dtype or q.dtype
    for name, a, e in zip(names, got, want):
        if e is None:
            assert a is None, name
            continue
        assert a is not None, f"{name} has no gradient"
        want_dtype = fastml.ops.linear_attention.reference.state_dtype(q.dtype) if name in (
            "kv", "z", "dkv0", "dz0") else q.dtype
        assert a.dtype == want_dtype, f"{name} has dtype {a.dtype}, expected {want_dtype}"
        assert_close(a, e, dtype=dtype, rtol=rtol, atol=atol, name=f"{backend} {name}")
    return got

"""The cuda backend of causal linear attention against the float64 reference, on a GPU, at full size: outputs,
final states and every gradient, for each dtype, feature map, head size (odd ones included), cu_seqlens and
initial state; the decode step; opcheck of the C++ ops."""
import pytest
import torch

import fastml
from fastml.ops.linear_attention import reference
from fastml.testing import assert_close
from la_check import check_backend, make_inputs

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, T, K, V): long sequences at the head sizes the kernels tile for, odd sizes, one-token and one-chunk edges.
SHAPES = [
    (1, 2, 8192, 64, 64),
    (2, 2, 4096, 128, 128),
    (1, 2, 2048, 256, 256),
    (2, 3, 1000, 60, 60),
    (1, 1, 257, 16, 200),
    (3, 2, 1, 64, 32),
    (1, 2, 64, 128, 72),
]
# (feature_map, normalize): the identity map is used unnormalized, where q'.z has no sign and can vanish.
MODES = [("elu+1", True), (None, False), ("relu", False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-norm{m[1]}")
def test_cuda_matches_reference(dtype, shape, mode):
    B, H, T, K, V = shape
    feature_map, normalize = mode
    q, k, v, state = make_inputs(B, H, T, K, V, dtype, "cuda", with_state=True, seed=T + K)
    check_backend("cuda", q, k, v, state, feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_without_state_and_scale(dtype):
    q, k, v, _ = make_inputs(2, 2, 777, 128, 64, dtype, "cuda", seed=3)
    check_backend("cuda", q, k, v, None, feature_map="elu+1", scale=128 ** -0.5, eps=1e-3)
    check_backend("cuda", q, k, v, None, feature_map=None, normalize=False, scale=0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_relu_normalized(dtype):
    q, k, v, state = make_inputs(1, 2, 3000, 64, 64, dtype, "cuda", with_state=True, seed=5)
    check_backend("cuda", q, k, v, state, feature_map="relu", normalize=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_cu_seqlens(dtype, with_state):
    # Segments of every kind: empty (first and in the middle), one token, shorter and longer than a chunk.
    bounds = [0, 0, 700, 701, 701, 2048, 5000]
    n_seq = len(bounds) - 1
    q, k, v, state = make_inputs(1, 3, bounds[-1], 128, 96, dtype, "cuda", with_state=with_state, n_seq=n_seq,
                                 seed=7)
    cu = torch.tensor(bounds, dtype=torch.int64, device="cuda")
    check_backend("cuda", q, k, v, state, feature_map="elu+1", cu_seqlens=cu)


def test_cuda_cu_seqlens_equals_separate_calls():
    bounds = [0, 100, 100, 613]
    q, k, v, _ = make_inputs(1, 2, bounds[-1], 64, 64, torch.float32, "cuda", seed=11)
    cu = torch.tensor(bounds, dtype=torch.int64, device="cuda")
    o, st = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", cu_seqlens=cu, output_final_state=True,
                                           backend="cuda")
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        oi, si = fastml.causal_linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], feature_map="elu+1",
                                                output_final_state=True, backend="cuda")
        assert_close(o[:, :, s:e], oi, name=f"segment {i} o")
        assert_close(st.kv[i:i + 1], si.kv, name=f"segment {i} kv")
        assert_close(st.z[i:i + 1], si.z, name=f"segment {i} z")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("KV", [(64, 64), (128, 128), (256, 256), (60, 33)], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-norm{m[1]}")
def test_cuda_step(dtype, KV, mode):
    K, V = KV
    feature_map, normalize = mode
    q, k, v, state = make_inputs(3, 4, 1, K, V, dtype, "cuda", with_state=True, seed=K + V)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    kv_before = state.kv.clone()
    o, new = fastml.linear_attention_step(q, k, v, state, feature_map=feature_map, normalize=normalize,
                                          backend="cuda")
    assert torch.equal(state.kv, kv_before), "the caller's state was modified"
    to64 = lambda t: t.detach().cpu().double()  # noqa: E731
    want_o, want_kv, want_z = reference.linear_attention_step(
        to64(q), to64(k), to64(v), (to64(state.kv), to64(state.z)), feature_map=reference.FEATURE_MAPS[feature_map],
        normalize=normalize)
    assert o.dtype == dtype and new.kv.dtype == reference.state_dtype(dtype)
    assert_close(o, want_o, dtype=dtype, name="step o")
    assert_close(new.kv, want_kv, dtype=dtype, name="step kv")
    assert_close(new.z, want_z, dtype=dtype, name="step z")


def test_cuda_step_gradients():
    q, k, v, state = make_inputs(2, 2, 1, 64, 48, torch.float32, "cuda", with_state=True, seed=13)
    check_backend("cuda", q, k, v, state, feature_map="elu+1")
    leaves = [t[:, :, 0].detach().clone().requires_grad_(True) for t in (q, k, v)]
    st = fastml.LinearAttentionState(*(t.detach().clone().requires_grad_(True) for t in state))
    o, new = fastml.linear_attention_step(*leaves, st, feature_map="elu+1", backend="cuda")
    (o.square().sum() + new.kv.sum() + new.z.sum()).backward()
    ref = [t.detach().cpu().double().requires_grad_(True) for t in leaves + list(st)]
    ro, rkv, rz = reference.linear_attention_step(*ref[:3], (ref[3], ref[4]), feature_map=1)
    (ro.square().sum() + rkv.sum() + rz.sum()).backward()
    for name, got, want in zip(["q", "k", "v", "kv", "z"], leaves + list(st), ref):
        assert_close(got.grad, want.grad, name=f"step d{name}")


def _fwd_args(dtype, cu=None, with_state=True):
    B = 1 if cu is not None else 2
    T = 130 if cu is None else int(cu[-1])
    n_seq = B if cu is None else cu.numel() - 1
    q, k, v, state = make_inputs(B, 2, T, 32, 24, dtype, "cuda", with_state=with_state, n_seq=n_seq, seed=17)
    kv0, z0 = (None, None) if state is None else state
    return q, k, v, kv0, z0, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_cuda_ops(dtype, packed):
    cu = torch.tensor([0, 50, 50, 120], dtype=torch.int64, device="cuda") if packed else None
    q, k, v, kv0, z0, cu = _fwd_args(dtype, cu)
    fwd_args = (q, k, v, kv0, z0, cu, 1, True, 1e-6, 1.0)
    torch.library.opcheck(torch.ops.fastml.linear_attention_fwd, fwd_args)
    o, kv, z, den = torch.ops.fastml.linear_attention_fwd(*fwd_args)
    go = torch.randn_like(o)
    bwd_args = (go, torch.randn_like(kv), None, q, k, v, o, den, kv0, z0, cu, 1, True, 1e-6, 1.0)
    torch.library.opcheck(torch.ops.fastml.linear_attention_bwd, bwd_args)


def test_opcheck_cuda_step():
    q, k, v, kv0, z0, _ = _fwd_args(torch.float32)
    args = (q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), kv0, z0, 2, False, 1e-6, 0.5)
    torch.library.opcheck(torch.ops.fastml.linear_attention_step, args)


def test_cuda_backend_refuses_large_head_dim():
    q = torch.zeros(1, 1, 4, 300, device="cuda")
    v = torch.zeros(1, 1, 4, 8, device="cuda")
    with pytest.raises(fastml.BackendUnavailable, match="up to 256"):
        fastml.causal_linear_attention(q, q, v, backend="cuda")
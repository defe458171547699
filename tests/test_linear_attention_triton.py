"""The triton backend of causal linear attention against the float64 reference: outputs, final states and every
gradient. Interpreter tests (TRITON_INTERPRET=1, CPU tensors) use small shapes with pairwise option coverage; the
`gpu` tests run the compiled kernels at full size (`make test-gpu`)."""
import pytest
import torch

import fastml
from fastml._backend import triton_cpu_error, triton_interpret
from fastml.testing import assert_close
from la_check import check_backend, make_inputs

interp = pytest.mark.skipif(triton_cpu_error() is not None, reason=str(triton_cpu_error()))


def gpu(test):
    """A test of the compiled kernels on CUDA tensors (conftest skips it without CUDA)."""
    return pytest.mark.gpu(pytest.mark.skipif(triton_interpret(), reason="TRITON_INTERPRET=1 is set")(test))

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (T, K, V, dtype, feature_map, normalize, scale, initial state): each pair of option values meets at least once.
CASES = [
    (1, 16, 16, F32, None, True, 1.0, False),
    (63, 60, 32, F32, "elu+1", True, 1.0, True),
    (130, 32, 64, F16, "relu", True, 0.5, True),
    (63, 64, 16, F16, None, False, 0.125, False),
    (130, 16, 60, F32, "elu+1", False, 0.25, True),
    (1, 32, 32, F16, "elu+1", False, 1.0, True),
    (63, 32, 64, F32, "relu", False, 1.0, False),
    (130, 64, 32, F16, "elu+1", True, 1.0, False),
    (130, 60, 16, F32, None, True, 0.5, True),
]


def _well_posed(q, k, fmap, normalize):
    """Identity features of either sign can put q'.z near zero, where o = q'S / (q'.z + eps) amplifies rounding
    without bound: normalized identity-map cases use non-negative features, as a real feature map would give."""
    if fmap is None and normalize:
        return q.abs(), k.abs()
    return q, k


@interp
@pytest.mark.parametrize("T,K,V,dtype,fmap,normalize,scale,with_state", CASES)
def test_matches_reference(T, K, V, dtype, fmap, normalize, scale, with_state):
    q, k, v, state = make_inputs(2, 2, T, K, V, dtype, with_state=with_state, seed=T + K)
    q, k = _well_posed(q, k, fmap, normalize)
    check_backend("triton", q, k, v, state, feature_map=fmap, normalize=normalize, scale=scale)


@interp
def test_head_dims_past_one_tile():
    # K and V above 128 split the backward into key tiles (dq) and value tiles whose dk shares are summed.
    q, k, v, state = make_inputs(1, 1, 20, 160, 144, F32, with_state=True)
    check_backend("triton", q, k, v, state, feature_map="elu+1", normalize=True)


@interp
@pytest.mark.parametrize("dtype,fmap,normalize,with_state", [(F32, "elu+1", True, True), (F16, None, False, False)])
def test_cu_seqlens(dtype, fmap, normalize, with_state):
    cu = torch.tensor([0, 40, 40, 97, 130])  # an empty segment, and segments that do not fill their last chunk
    q, k, v, state = make_inputs(1, 2, 130, 32, 16, dtype, with_state=with_state, n_seq=4)
    check_backend("triton", q, k, v, state, feature_map=fmap, normalize=normalize, cu_seqlens=cu, scale=0.5)


@interp
@pytest.mark.parametrize("dtype,fmap,normalize", [(F32, "elu+1", True), (F16, "relu", False)])
def test_step_matches_causal(dtype, fmap, normalize):
    q, k, v, state = make_inputs(2, 3, 5, 60, 24, dtype, with_state=True)
    opts = dict(feature_map=fmap, normalize=normalize, scale=0.5, backend="triton")
    o_all, final = fastml.causal_linear_attention(q, k, v, initial_state=state, output_final_state=True, **opts)
    st = state
    for t in range(q.shape[2]):
        o, st = fastml.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, **opts)
        assert o.dtype == dtype
        assert_close(o, o_all[:, :, t], dtype=dtype, name=f"step {t} o")
    # float16 inputs multiply float32 operands in TF32 in the chunked kernel (common.dot_types); float32 in IEEE.
    assert_close(st.kv, final.kv, dtype=dtype, name="kv")
    assert_close(st.z, final.z, dtype=dtype, name="z")


@interp
def test_opcheck():
    q, k, v, state = make_inputs(1, 2, 20, 16, 16, F32, with_state=True)
    fwd = (q, k, v, state.kv, state.z, None, 1, True, 1e-6, 1.0)
    torch.library.opcheck(torch.ops.fastml.linear_attention_fwd_triton.default, fwd)
    o, kv, z, den = torch.ops.fastml.linear_attention_fwd_triton(*fwd)
    bwd = (torch.randn_like(o), torch.randn_like(kv), None, q, k, v, o, den, state.kv, state.z, None, 1, True, 1e-6,
           1.0)
    torch.library.opcheck(torch.ops.fastml.linear_attention_bwd_triton.default, bwd)
    step = (q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), state.kv, state.z, 2, False,
            1e-6, 0.5)
    torch.library.opcheck(torch.ops.fastml.linear_attention_step_triton.default, step)


@interp
@pytest.mark.parametrize("K,V", [(0, 8), (8, 0)])
def test_empty_head_dims_are_refused_with_reason(K, V):
    # The kernels tile K and V; an empty head dim is served by the cpp and reference backends.
    q, k, v, _ = make_inputs(1, 2, 5, K, V, F32)
    with pytest.raises(fastml.BackendUnavailable, match="head dims"):
        fastml.causal_linear_attention(q, k, v, backend="triton")
    with pytest.raises(fastml.BackendUnavailable, match="head dims"):
        fastml.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], None, backend="triton")
    o, st = fastml.causal_linear_attention(q, k, v, output_final_state=True, backend="cpp")
    assert o.shape == (1, 2, 5, V) and st.kv.shape == (1, 2, K, V)


@interp
def test_float64_is_refused_with_reason():
    q, k, v, _ = make_inputs(1, 1, 4, 16, 16, torch.float64)
    with pytest.raises(fastml.BackendUnavailable, match="float64"):
        fastml.causal_linear_attention(q, k, v, backend="triton")


GPU_CASES = [
    # B, H, T, K, V, dtype, feature_map, normalize, scale, initial state
    (2, 2, 8192, 128, 128, BF16, "elu+1", True, 1.0, True),
    (1, 2, 4096, 256, 256, BF16, None, False, 256 ** -0.5, False),
    (2, 2, 8192, 128, 128, BF16, None, False, 128 ** -0.5, True),
    (1, 2, 2048, 256, 256, F16, "elu+1", True, 1.0, True),
    (2, 3, 1000, 128, 128, F16, "relu", True, 0.5, False),
    (1, 2, 3001, 64, 128, F32, "elu+1", False, 0.125, True),
    (2, 2, 777, 60, 100, F32, None, True, 1.0, False),
]


@gpu
@pytest.mark.parametrize("B,H,T,K,V,dtype,fmap,normalize,scale,with_state", GPU_CASES)
def test_gpu_matches_reference(B, H, T, K, V, dtype, fmap, normalize, scale, with_state):
    q, k, v, state = make_inputs(B, H, T, K, V, dtype, "cuda", with_state=with_state)
    q, k = _well_posed(q, k, fmap, normalize)
    check_backend("triton", q, k, v, state, feature_map=fmap, normalize=normalize, scale=scale)


@gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_cu_seqlens(dtype):
    cu = torch.tensor([0, 1000, 1000, 4097, 5000], device="cuda")
    q, k, v, state = make_inputs(1, 2, 5000, 128, 128, dtype, "cuda", with_state=True, n_seq=4)
    check_backend("triton", q, k, v, state, feature_map="elu+1", normalize=True, cu_seqlens=cu)


@gpu
def test_gpu_step_matches_causal():
    q, k, v, state = make_inputs(2, 4, 3, 128, 128, BF16, "cuda", with_state=True)
    opts = dict(feature_map="elu+1", backend="triton")
    o_all, final = fastml.causal_linear_attention(q, k, v, initial_state=state, output_final_state=True, **opts)
    st = state
    for t in range(q.shape[2]):
        o, st = fastml.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, **opts)
        assert_close(o, o_all[:, :, t], dtype=BF16, name=f"step {t} o")
    assert_close(st.kv, final.kv, name="kv")
    assert_close(st.z, final.z, name="z")



@interp
def test_compiles_fullgraph_with_gradients():
    q, k, v, state = make_inputs(1, 2, 40, 16, 16, F32, with_state=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def f(q, k, v):
        o, st = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state,
                                               output_final_state=True, backend="triton")
        return o.square().sum() + st.kv.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(*leaves).backward()
    want = [t.clone().requires_grad_(True) for t in (q, k, v)]
    f(*want).backward()
    for got, exp, name in zip(leaves, want, "qkv"):
        assert_close(got.grad, exp.grad, name=f"d{name}")

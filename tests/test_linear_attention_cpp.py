"""The cpp backend of causal linear attention (csrc/cpu/linear_attention.cpp) against the reference: outputs, final
states and every gradient, over shapes that cross and miss the kernel's tiles (16 lanes, 64-token blocks)."""
import pytest
import torch

import fastml
from fastml._ext import load_error
from fastml.testing import assert_close
from la_check import check_backend, make_inputs

pytestmark = pytest.mark.skipif(load_error() is not None, reason=str(load_error()))

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# Pairwise rather than exhaustive: every T, K, V, dtype, feature map, normalize and state option appears with
# several of the others. Identity with normalize=True only in float64: its denominator q.z can pass through zero,
# which no lower precision reproduces.
CASES = [
    # T, K, V, dtype, feature_map, normalize, with_state, scale
    (1, 16, 16, F32, None, False, True, 0.7),
    (63, 60, 64, F32, "elu+1", True, True, 1.0),
    (257, 64, 128, F32, "relu", False, False, 0.125),
    (257, 128, 60, F32, "elu+1", False, True, 0.7),
    (257, 64, 64, F32, None, False, True, 1.0),  # the kernels read and write the tensors in place: no copies
    (63, 16, 128, F64, None, False, False, 0.7),
    (257, 128, 60, F64, "elu+1", True, True, 0.7),
    (63, 64, 64, F64, None, True, True, 1.0),
    (1, 60, 16, F64, "relu", True, True, 0.7),
    (63, 64, 64, BF16, "elu+1", True, True, 0.7),
    (257, 60, 16, BF16, None, False, False, 1.0),
    (1, 128, 128, BF16, "relu", False, True, 0.7),
    (63, 128, 60, F16, "relu", False, True, 0.7),
    (257, 16, 64, F16, "elu+1", True, False, 0.7),
    (1, 64, 60, F16, "elu+1", True, False, 1.0),
]


@pytest.mark.parametrize("T,K,V,dtype,feature_map,normalize,with_state,scale", CASES)
def test_matches_reference(T, K, V, dtype, feature_map, normalize, with_state, scale):
    q, k, v, state = make_inputs(2, 3, T, K, V, dtype, with_state=with_state)
    check_backend("cpp", q, k, v, state, feature_map=feature_map, normalize=normalize, scale=scale)


@pytest.mark.parametrize("dtype,feature_map,normalize,with_state", [
    (F32, "elu+1", True, True),
    (F64, "relu", False, False),
    (BF16, None, False, True),
])
def test_cu_seqlens(dtype, feature_map, normalize, with_state):
    # Segments shorter than, equal to (after the empty one) and longer than a 64-token block.
    cu = torch.tensor([0, 5, 5, 69, 150, 151])
    q, k, v, state = make_inputs(1, 2, 151, 60, 64, dtype, with_state=with_state, n_seq=5)
    check_backend("cpp", q, k, v, state, feature_map=feature_map, normalize=normalize, scale=0.7, cu_seqlens=cu)


def test_unaligned_inputs():
    # Contiguous views that start 4 bytes into their storage: the no-copy path loads vectors straight from them
    # (the ops are called directly, as the autograd wrapper would clone nothing either).
    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)

    q, k, v, _ = make_inputs(1, 2, 100, 64, 64, F32)
    args = (None, None, None, 0, False, 1e-6, 1.0)
    want = torch.ops.fastml.linear_attention_fwd(q, k, v, *args)
    got = torch.ops.fastml.linear_attention_fwd(shifted(q), shifted(k), shifted(v), *args)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    go = torch.randn_like(v)
    want = torch.ops.fastml.linear_attention_bwd(go, None, None, q, k, v, want[0], want[3], *args)
    got = torch.ops.fastml.linear_attention_bwd(shifted(go), None, None, shifted(q), shifted(k), shifted(v),
                                                shifted(got[0]), got[3], *args)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_cu_seqlens_equals_separate_calls():
    cu = torch.tensor([0, 70, 70, 100])
    q, k, v, state = make_inputs(1, 2, 100, 16, 32, F32, with_state=True, n_seq=3)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state,
                                           output_final_state=True, cu_seqlens=cu, backend="cpp")
    for i in range(3):
        s, e = int(cu[i]), int(cu[i + 1])
        st = fastml.LinearAttentionState(state.kv[i:i + 1], state.z[i:i + 1])
        oi, fi = fastml.causal_linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], feature_map="elu+1",
                                                initial_state=st, output_final_state=True, backend="cpp")
        assert_close(o[:, :, s:e], oi, name=f"o of segment {i}")
        assert_close(fs.kv[i:i + 1], fi.kv, name=f"kv of segment {i}")
        assert_close(fs.z[i:i + 1], fi.z, name=f"z of segment {i}")


@pytest.mark.parametrize("dtype,feature_map,normalize", [(F32, "elu+1", True), (F64, None, False),
                                                         (BF16, "relu", True)])
def test_step_matches_causal(dtype, feature_map, normalize):
    q, k, v, state = make_inputs(2, 3, 1, 60, 64, dtype, with_state=True)
    opts = dict(feature_map=feature_map, normalize=normalize, scale=0.7)
    o, st = fastml.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, backend="cpp", **opts)
    o2, st2 = fastml.causal_linear_attention(q, k, v, initial_state=state, output_final_state=True,
                                             backend="reference", **opts)
    assert o.dtype == dtype and st.kv.dtype == state.kv.dtype and st.z.dtype == state.z.dtype
    assert_close(o, o2[:, :, 0], dtype=dtype, name="o")
    assert_close(st.kv, st2.kv, dtype=dtype, name="kv")
    assert_close(st.z, st2.z, dtype=dtype, name="z")


def test_step_chain_equals_sequence():
    q, k, v, state = make_inputs(1, 2, 5, 16, 16, F64, with_state=True)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state,
                                           output_final_state=True, backend="cpp")
    st = state
    for t in range(5):
        ot, st = fastml.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, feature_map="elu+1",
                                              backend="cpp")
        assert_close(ot, o[:, :, t], name=f"o at step {t}")
    assert_close(st.kv, fs.kv, name="kv")
    assert_close(st.z, fs.z, name="z")


@pytest.mark.parametrize("feature_map,normalize,cu", [("elu+1", True, None), (None, False, [0, 30, 30, 70])])
def test_gradcheck(feature_map, normalize, cu):
    # T = 70 crosses a 64-token block, so the backward's block-reversed scan is exercised.
    n_seq = 1 if cu is None else len(cu) - 1
    q, k, v, state = make_inputs(1, 2, 70, 5, 3, F64, with_state=True, n_seq=n_seq)
    leaves = [t.requires_grad_() for t in (q, k, v, state.kv, state.z)]
    cu_t = None if cu is None else torch.tensor(cu)

    def f(q, k, v, kv, z):
        o, fs = fastml.causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7,
                                               initial_state=fastml.LinearAttentionState(kv, z),
                                               output_final_state=True, cu_seqlens=cu_t, backend="cpp")
        return o, fs.kv, fs.z

    assert torch.autograd.gradcheck(f, leaves)


def _op_samples():
    q, k, v, state = make_inputs(1, 2, 70, 16, 20, F32, with_state=True)
    o, kv, z, den = torch.ops.fastml.linear_attention_fwd(q, k, v, state.kv, state.z, None, 1, True, 1e-6, 0.7)
    go = torch.randn_like(o)
    fwd = (q, k, v, state.kv, state.z, None, 1, True, 1e-6, 0.7)
    bwd = (go, torch.randn_like(kv), None, q, k, v, o, den, state.kv, state.z, None, 1, True, 1e-6, 0.7)
    cu = torch.tensor([0, 30, 70])
    qc, kc, vc, sc = make_inputs(1, 2, 70, 16, 20, F32, with_state=True, n_seq=2)
    fwd_cu = (qc, kc, vc, sc.kv, sc.z, cu, 2, False, 1e-6, 1.0)
    return fwd, bwd, fwd_cu


def test_opcheck():
    fwd, bwd, fwd_cu = _op_samples()
    torch.library.opcheck(torch.ops.fastml.linear_attention_fwd.default, fwd)
    torch.library.opcheck(torch.ops.fastml.linear_attention_fwd.default, fwd_cu)
    torch.library.opcheck(torch.ops.fastml.linear_attention_bwd.default, bwd)
    q, k, v, state = make_inputs(2, 3, 1, 16, 20, F32, with_state=True)
    step = (q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), state.kv, state.z, 2, True,
            1e-6, 0.5)
    torch.library.opcheck(torch.ops.fastml.linear_attention_step.default, step)


def test_nan_propagates():
    q, k, v, state = make_inputs(2, 2, 130, 16, 16, F32, with_state=True)
    q[0, 1, 70, 3] = float("nan")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = fastml.causal_linear_attention(*leaves, feature_map="elu+1", initial_state=state, backend="cpp")
    assert torch.isnan(o[0, 1, 70]).all()
    # Only that token reads the NaN query; everything else stays finite.
    mask = torch.ones(o.shape[:3], dtype=torch.bool)
    mask[0, 1, 70] = False
    assert torch.isfinite(o[mask]).all()
    o.sum().backward()
    assert torch.isnan(q.grad[0, 1, 70]).any()
    assert torch.isfinite(q.grad[1]).all() and torch.isfinite(k.grad[1]).all()


def test_deterministic():
    q, k, v, state = make_inputs(2, 3, 200, 64, 64, F32, with_state=True)
    a = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, backend="cpp")
    b = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, backend="cpp")
    assert torch.equal(a, b)

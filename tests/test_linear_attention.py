"""Causal linear attention: the reference against the maths, and every backend this machine runs (see
support.TARGETS) against the float64 reference on outputs, final states and all gradients, plus the invariants
each backend keeps (resume, packed sequences, decode steps, NaN, layouts, determinism, torch.compile, opcheck)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastml
from fastml._numerics import acc_dtype
from fastml.testing import assert_close, assert_close_norm
from support import BF16, F16, F32, F64, check_la_backend, la_inputs, la_ops, per_target, targets

MAPS = {None: lambda x: x, "elu+1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}


def naive(q, k, v, *, feature_map=None, normalize=True, eps=1e-6, scale=1.0, state=None):
    """The recurrence token by token, in float64, with nothing clever."""
    phi = MAPS[feature_map] if not callable(feature_map) else feature_map
    q, k, v = (t.double() for t in (q, k, v))
    qf, kf = scale * phi(q), phi(k)
    B, H, T, K = qf.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=F64) if state is None else state[0].double().clone()
    z = torch.zeros(B, H, K, dtype=F64) if state is None else state[1].double().clone()
    outs = []
    for t in range(T):
        S = S + kf[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + kf[:, :, t]
        o = torch.einsum("bhk,bhkv->bhv", qf[:, :, t], S)
        if normalize:
            o = o / ((qf[:, :, t] * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    o = torch.stack(outs, 2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o, S, z


# ---- the reference against the maths ----


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("feature_map,normalize", [(None, False), ("elu+1", True), ("relu", True), ("elu+1", False)])
def test_reference_matches_recurrence(T, feature_map, normalize):
    q, k, v, state = la_inputs(2, 2, T, 16, 12, F64, with_state=True)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7,
                                           initial_state=state, output_final_state=True, backend="reference")
    o2, S, z = naive(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7, state=state)
    assert_close(o, o2, name="o")
    assert_close(fs.kv, S, name="kv")
    assert_close(fs.z, z, name="z")


def test_noncausal_matches_maths():
    q, _, _, _ = la_inputs(2, 2, 7, 8, 4, F64)
    _, k, v, _ = la_inputs(2, 2, 11, 8, 4, F64, seed=3)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 6:] = True
    v[1, :, 8] = float("nan")  # a padded position may hold anything
    o = fastml.linear_attention(q, k, v, feature_map="elu+1", key_padding_mask=mask)
    for b, n in ((0, 11), (1, 6)):
        qf, kf = MAPS["elu+1"](q[b]), MAPS["elu+1"](k[b, :, :n])
        want = (qf @ kf.transpose(-1, -2) @ v[b, :, :n]) / ((qf @ kf.transpose(-1, -2)).sum(-1, keepdim=True) + 1e-6)
        assert_close(o[b], want)


# ---- every backend against the reference ----

# Pairwise rather than exhaustive: every T, K, V, dtype, feature map, normalize, scale and state option meets each
# other value at least once. The identity map with normalize=True gets non-negative q, k (la_inputs'
# `nonnegative`): with features of either sign q'.z can pass through zero, which no precision reproduces.
# (B, H, T, K, V, dtype, feature_map, normalize, scale, with_state)
CASES = {
    # reference and cpp: 16 lanes and 64-token blocks, crossed and missed.
    "cpu": [
        (2, 3, 1, 16, 16, F32, None, False, 0.7, True),
        (2, 3, 63, 60, 64, F32, "elu+1", True, 1.0, True),
        (2, 3, 257, 64, 128, F32, "relu", False, 0.125, False),
        (2, 3, 257, 128, 60, F32, "elu+1", False, 0.7, True),
        (2, 3, 257, 64, 64, F32, None, True, 1.0, True),
        (2, 3, 63, 16, 128, F64, None, False, 0.7, False),
        (2, 3, 257, 128, 60, F64, "elu+1", True, 0.7, True),
        (2, 3, 63, 64, 64, F64, None, True, 1.0, True),
        (2, 3, 1, 60, 16, F64, "relu", True, 0.7, True),
        (2, 3, 63, 64, 64, BF16, "elu+1", True, 0.7, True),
        (2, 3, 257, 60, 16, BF16, None, False, 1.0, False),
        (2, 3, 1, 128, 128, BF16, "relu", False, 0.7, True),
        (2, 3, 63, 128, 60, F16, "relu", False, 0.7, True),
        (2, 3, 257, 16, 64, F16, "elu+1", True, 0.7, False),
        (2, 3, 1, 64, 60, F16, "elu+1", True, 1.0, False),
    ],
    # triton in the interpreter: every program runs in Python, so fewer and shorter cases.
    "interp": [
        (2, 2, 1, 16, 16, F32, None, True, 1.0, False),
        (2, 2, 63, 60, 32, F32, "elu+1", True, 1.0, True),
        (2, 2, 130, 32, 64, F16, "relu", True, 0.5, True),
        (2, 2, 63, 64, 16, F16, None, False, 0.125, False),
        (2, 2, 130, 16, 60, F32, "elu+1", False, 0.25, True),
        (2, 2, 1, 32, 32, F16, "elu+1", False, 1.0, True),
        (2, 2, 63, 32, 64, F32, "relu", False, 1.0, False),
        (2, 2, 130, 64, 32, F16, "elu+1", True, 1.0, False),
        (2, 2, 130, 60, 16, F32, None, True, 0.5, True),
        (1, 1, 20, 160, 144, F32, "elu+1", True, 1.0, True),  # K, V past one 128-wide tile of the backward
    ],
    # triton and cuda on a GPU, at full size: long sequences at the tiled head sizes, odd sizes, one token.
    "gpu": [
        (1, 2, 8192, 64, 64, BF16, "elu+1", True, 1.0, True),
        (2, 2, 8192, 128, 128, BF16, None, False, 128 ** -0.5, True),
        (2, 2, 4096, 128, 128, F16, "relu", False, 0.5, True),
        (1, 2, 2048, 256, 256, BF16, None, False, 256 ** -0.5, False),
        (1, 2, 2048, 256, 256, F16, "elu+1", True, 1.0, True),
        (2, 3, 1000, 60, 60, F32, "relu", True, 0.5, False),
        (1, 1, 257, 16, 200, F16, "elu+1", True, 1.0, True),
        (3, 2, 1, 64, 32, F32, None, False, 1.0, True),
        (1, 2, 64, 128, 72, BF16, "relu", True, 0.7, True),
        (2, 2, 777, 60, 100, F32, None, True, 1.0, False),
        (1, 2, 3001, 64, 128, F32, "elu+1", False, 0.125, True),
        (2, 2, 777, 128, 64, F64, "elu+1", True, 128 ** -0.5, False),
    ],
}


@pytest.mark.parametrize("target,B,H,T,K,V,dtype,feature_map,normalize,scale,with_state", per_target(CASES))
def test_matches_reference(target, B, H, T, K, V, dtype, feature_map, normalize, scale, with_state):
    q, k, v, state = la_inputs(B, H, T, K, V, dtype, target.device, with_state=with_state, seed=T + K,
                               nonnegative=feature_map is None and normalize)
    check_la_backend(target, q, k, v, state, feature_map=feature_map, normalize=normalize, scale=scale)


# (cu_seqlens, H, K, V, dtype, feature_map, normalize, with_state): segments that are empty (first, or between
# others), one token, and shorter and longer than a block or chunk.
CU_CASES = {
    "cpu": [((0, 5, 5, 69, 150, 151), 2, 60, 64, dt, fm, norm, st) for dt, fm, norm, st in (
        (F32, "elu+1", True, True), (F64, "relu", False, False), (BF16, None, False, True))],
    "interp": [((0, 40, 40, 97, 130), 2, 32, 16, dt, fm, norm, st) for dt, fm, norm, st in (
        (F32, "elu+1", True, True), (F16, None, False, False))],
    "gpu": [((0, 0, 700, 701, 701, 2048, 5000), 3, 128, 96, dt, fm, norm, st) for dt, fm, norm, st in (
        (BF16, "elu+1", True, True), (F16, "relu", False, False), (F32, "elu+1", True, False))],
}


@pytest.mark.parametrize("target,cu,H,K,V,dtype,feature_map,normalize,with_state", per_target(CU_CASES))
def test_cu_seqlens_matches_reference(target, cu, H, K, V, dtype, feature_map, normalize, with_state):
    q, k, v, state = la_inputs(1, H, cu[-1], K, V, dtype, target.device, with_state=with_state, n_seq=len(cu) - 1)
    check_la_backend(target, q, k, v, state, feature_map=feature_map, normalize=normalize, scale=0.7,
                     cu_seqlens=torch.tensor(cu, device=target.device))


@pytest.mark.parametrize("target", targets(dtype=F64))
@given(lengths=st.lists(st.integers(0, 80), min_size=1, max_size=4), fmap=st.sampled_from([None, "elu+1", "relu"]),
       normalize=st.booleans())
def test_property_cu_seqlens_equals_separate_calls(target, lengths, fmap, normalize):
    normalize = normalize and fmap is not None
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, state = la_inputs(1, 2, sum(lengths), 8, 5, F64, target.device, with_state=True, n_seq=len(lengths),
                               seed=sum(lengths))
    opts = dict(feature_map=fmap, normalize=normalize, output_final_state=True, backend=target.backend)
    o, fs = fastml.causal_linear_attention(q, k, v, initial_state=state, cu_seqlens=cu.to(target.device), **opts)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        st_i = fastml.LinearAttentionState(state.kv[i:i + 1], state.z[i:i + 1])
        oi, si = fastml.causal_linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], initial_state=st_i,
                                                **opts)
        assert_close(o[:, :, s:e], oi, name=f"o of segment {i}")
        assert_close(fs.kv[i:i + 1], si.kv, name=f"kv of segment {i}")
        assert_close(fs.z[i:i + 1], si.z, name=f"z of segment {i}")


@pytest.mark.parametrize("target", targets(dtype=F64))
@given(T=st.integers(1, 140), K=st.sampled_from([4, 16, 33]), V=st.sampled_from([3, 16]),
       fmap=st.sampled_from([None, "elu+1", "relu"]), normalize=st.booleans(), cut=st.floats(0, 1))
def test_property_matches_recurrence_and_resumes(target, T, K, V, fmap, normalize, cut):
    normalize = normalize and fmap is not None  # identity features can make q'.z ~ 0
    q, k, v, state = la_inputs(1, 2, T, K, V, F64, target.device, with_state=True, seed=T)
    opts = dict(feature_map=fmap, normalize=normalize, backend=target.backend)
    o = fastml.causal_linear_attention(q, k, v, initial_state=state, **opts)
    o2, _, _ = naive(q.cpu(), k.cpu(), v.cpu(), feature_map=fmap, normalize=normalize,
                     state=[t.cpu() for t in state])
    assert_close(o, o2, name="o")
    c = int(cut * T)
    _, s1 = fastml.causal_linear_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], initial_state=state,
                                           output_final_state=True, **opts)
    o3 = fastml.causal_linear_attention(q[:, :, c:], k[:, :, c:], v[:, :, c:], initial_state=s1, **opts)
    assert_close(o3, o[:, :, c:], name="resumed o")


@pytest.mark.parametrize("target,dtype", per_target({"cpu": [F32, F64], "interp": [F32], "gpu": [F32, F64]}))
def test_split_and_resume_equals_whole(target, dtype):
    q, k, v, _ = la_inputs(2, 3, 150, 16, 16, dtype, target.device)
    opts = dict(feature_map="elu+1", output_final_state=True, backend=target.backend)
    o, fs = fastml.causal_linear_attention(q, k, v, **opts)
    o1, s1 = fastml.causal_linear_attention(q[:, :, :77], k[:, :, :77], v[:, :, :77], **opts)
    o2, s2 = fastml.causal_linear_attention(q[:, :, 77:], k[:, :, 77:], v[:, :, 77:], initial_state=s1, **opts)
    assert_close(torch.cat([o1, o2], 2), o, name="o")
    # The final state is a sum over all 150 tokens, split at another place than the kernels' blocks.
    assert_close_norm(s2.kv, fs.kv, dim=-1, name="kv")
    assert_close_norm(s2.z, fs.z, dim=-1, name="z")


# ---- the decode step ----

# (H, K, V, dtype, feature_map, normalize)
STEP_CASES = {
    "cpu": [(3, 60, 64, F32, "elu+1", True), (3, 60, 64, F64, None, False), (3, 60, 64, BF16, "relu", True),
            (2, 16, 16, F16, "elu+1", False)],
    "interp": [(3, 60, 24, F32, "elu+1", True), (3, 60, 24, F16, "relu", False)],
    "gpu": [(4, K, V, dt, fm, norm) for (K, V), dt, (fm, norm) in (
        ((64, 64), F32, ("elu+1", True)), ((128, 128), BF16, ("elu+1", True)), ((256, 256), F16, (None, False)),
        ((60, 33), F64, ("relu", False)), ((128, 128), F32, ("relu", False)), ((60, 33), BF16, (None, False)))],
}


@pytest.mark.parametrize("target,H,K,V,dtype,feature_map,normalize", per_target(STEP_CASES))
def test_step_chain_matches_reference(target, H, K, V, dtype, feature_map, normalize):
    # Five decode steps from a state (the step kernels, no gradients) against the float64 reference.
    q, k, v, state = la_inputs(2, H, 5, K, V, dtype, target.device, with_state=True)
    opts = dict(feature_map=feature_map, normalize=normalize, scale=0.7)
    to64 = [t.cpu().double() for t in (q, k, v, state.kv, state.z)]
    want, want_state = fastml.causal_linear_attention(
        *to64[:3], initial_state=fastml.LinearAttentionState(*to64[3:]), output_final_state=True, backend="reference",
        **opts)
    kv_before = state.kv.clone()
    st = state
    for t in range(5):
        o, st = fastml.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, backend=target.backend,
                                             **opts)
        assert o.dtype == dtype and st.kv.dtype == st.z.dtype == acc_dtype(dtype)
        assert_close(o, want[:, :, t], dtype=dtype, name=f"o at step {t}")
    assert torch.equal(state.kv, kv_before), "the caller's state was modified"
    assert_close(st.kv, want_state.kv, dtype=dtype, name="kv")
    assert_close(st.z, want_state.z, dtype=dtype, name="z")


@pytest.mark.parametrize("target", targets())
def test_step_gradients_match_reference(target):
    dtype = F64 if F64 in target.dtypes() else F32
    q, k, v, state = la_inputs(2, 2, 1, 8, 4, dtype, target.device, with_state=True)
    grads = []
    for backend, to in ((target.backend, lambda t: t), ("reference", lambda t: t.cpu().double())):
        leaves = [to(t[:, :, 0]).clone().requires_grad_() for t in (q, k, v)]
        st_ = fastml.LinearAttentionState(*(to(t).clone().requires_grad_() for t in state))
        o, ns = fastml.linear_attention_step(*leaves, st_, feature_map="elu+1", backend=backend)
        (o.square().sum() + ns.kv.sum() * 0.3 + ns.z.sum() * 0.2).backward()
        grads.append([t.grad for t in leaves + list(st_)])
    for a, e, name in zip(*grads, ["q", "k", "v", "kv", "z"]):
        assert_close(a, e, dtype=dtype, name=f"step d{name}")


# ---- invariants ----


@pytest.mark.parametrize("target", targets(dtype=F64))
def test_callable_feature_map_changes_dim(target):
    q, k, v, _ = la_inputs(1, 2, 40, 8, 4, F64, target.device)

    def phi(x):
        return torch.cat([torch.relu(x), torch.relu(-x)], -1)  # K -> 2K

    o, fs = fastml.causal_linear_attention(q, k, v, feature_map=phi, output_final_state=True,
                                           backend=target.backend)
    o2, S, _ = naive(q.cpu(), k.cpu(), v.cpu(), feature_map=phi)
    assert fs.kv.shape == (1, 2, 16, 4)
    assert_close(o, o2)
    assert_close(fs.kv, S)


def test_noncontiguous_inputs_and_inputs_untouched(target):
    x = torch.randn(2, 70, 3, 16, generator=torch.Generator().manual_seed(0)).to(target.device)
    q, k, v = x.transpose(1, 2), (x * 0.5).transpose(1, 2), (x - 1).transpose(1, 2)  # [B, T, H, K] as [B, H, T, K]
    before = [t.clone() for t in (q, k, v)]
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=target.backend)
    want = fastml.causal_linear_attention(*(t.contiguous() for t in (q, k, v)), feature_map="elu+1",
                                          backend=target.backend)
    assert_close(o, want)
    for a, b in zip((q, k, v), before):
        assert torch.equal(a, b)


def test_nan_in_gives_nan_out(target):
    # Chunked kernels multiply a masked [C, C] block, so a NaN may reach earlier tokens of its own chunk (0 * NaN);
    # earlier chunks stay clean and every later token is NaN.
    q, k, v, _ = la_inputs(1, 1, 150, 8, 8, F32, target.device)
    v[0, 0, 130, 3] = float("nan")
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=target.backend)
    assert not o[0, 0, :128].isnan().any()
    assert o[0, 0, 130:, 3].isnan().all()
    # Through each feature map (a NaN key feature reaches every later output; a NaN query its own token).
    for fmap in ("elu+1", "relu", None):
        for name in ("q", "k"):
            t = {"q": q.clone(), "k": k.clone(), "v": v[..., :3].clone()}
            t[name][0, 0, 70, 2] = float("nan")
            o = fastml.causal_linear_attention(t["q"], t["k"], t["v"], feature_map=fmap, backend=target.backend)
            assert not o[0, 0, :64].isnan().any(), (fmap, name)
            assert o[0, 0, 70].isnan().all(), (fmap, name)
            st_ = fastml.LinearAttentionState(q.new_zeros(1, 1, 8, 3), q.new_zeros(1, 1, 8))
            o, _ = fastml.linear_attention_step(t["q"][:, :, 70], t["k"][:, :, 70], t["v"][:, :, 70], st_,
                                                feature_map=fmap, backend=target.backend)
            assert o.isnan().all(), (fmap, name, "step")
    # Gradients at a NaN input follow torch: relu's backward passes the gradient there (NaN <= 0 is false).
    qn = q.clone()
    qn[0, 0, 70, 2] = float("nan")
    grads = []
    for backend, to in ((target.backend, lambda t: t), ("reference", lambda t: t.cpu().double())):
        leaf = to(qn).detach().clone().requires_grad_()
        fastml.causal_linear_attention(leaf, to(k), to(v), feature_map="relu", normalize=False,
                                       backend=backend).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].isnan().any()
    # dq of a token is a sum over that token's prefix (norm-wise would not see the NaN pattern: compared
    # element-wise with float32's tolerance scaled by the prefix length's growth).
    assert_close(grads[0], grads[1], equal_nan=True, dtype=F32, rtol=1e-4, atol=1e-4, name="dq")


def test_deterministic(target):
    q, k, v, state = la_inputs(2, 3, 200, 64, 64, F32, target.device, with_state=True)
    a = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, backend=target.backend)
    b = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, backend=target.backend)
    assert torch.equal(a, b)


def test_state_dtype_is_the_accumulation_dtype(target):
    for dtype in target.dtypes():
        q, k, v, _ = la_inputs(1, 2, 10, 8, 8, dtype, target.device)
        o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", output_final_state=True,
                                               backend=target.backend)
        assert o.dtype == dtype and fs.kv.dtype == fs.z.dtype == acc_dtype(dtype)
    assert acc_dtype(F64) == F64 and acc_dtype(BF16) == acc_dtype(F16) == F32


@pytest.mark.parametrize("target,dtype,fmap,normalize,cu", per_target(
    {"cpu": [(F64, "elu+1", True, None), (F64, None, False, (0, 30, 30, 70))],
     "gpu": [(F64, "elu+1", True, None), (F64, "relu", True, (0, 30, 30, 70))]}))
def test_gradcheck(target, dtype, fmap, normalize, cu):
    # T = 70 crosses a 64-token block, so the backward's block-reversed scan is exercised.
    n_seq = 1 if cu is None else len(cu) - 1
    q, k, v, state = la_inputs(1, 2, 70, 5, 3, dtype, target.device, with_state=True, n_seq=n_seq)
    leaves = [t.requires_grad_() for t in (q, k, v, state.kv, state.z)]
    cu_t = None if cu is None else torch.tensor(cu, device=target.device)

    def f(q, k, v, kv, z):
        o, fs = fastml.causal_linear_attention(q, k, v, feature_map=fmap, normalize=normalize, scale=0.7,
                                               initial_state=fastml.LinearAttentionState(kv, z),
                                               output_final_state=True, cu_seqlens=cu_t, backend=target.backend)
        return o, fs.kv, fs.z

    # fast_mode: one random projection of the Jacobian per output, not every column.
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


# ---- the kernel ops ----


@pytest.mark.parametrize("target", targets(kernels=True))
def test_opcheck(target):
    fwd_op, bwd_op, step_op = la_ops(target)
    q, k, v, state = la_inputs(1, 2, 70, 16, 20, F32, target.device, with_state=True)
    fwd = (q, k, v, state.kv, state.z, None, 1, True, 1e-6, 0.7)
    torch.library.opcheck(fwd_op.default, fwd)
    o, kv, z, den = fwd_op(*fwd)
    bwd = (torch.randn_like(o), torch.randn_like(kv), None, q, k, v, o, den, state.kv, state.z, None, 1, True, 1e-6,
           0.7)
    torch.library.opcheck(bwd_op.default, bwd)
    qc, kc, vc, sc = la_inputs(1, 2, 70, 16, 20, F32, target.device, with_state=True, n_seq=2)
    cu = torch.tensor([0, 30, 70], device=target.device)
    torch.library.opcheck(fwd_op.default, (qc, kc, vc, sc.kv, sc.z, cu, 2, False, 1e-6, 1.0))
    step = (q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), state.kv, state.z, 2, True,
            1e-6, 0.5)
    torch.library.opcheck(step_op.default, step)


@pytest.mark.parametrize("target", targets(kernels=True))
def test_unaligned_inputs(target):
    # Contiguous views that start 4 bytes into their storage: vector loads straight from them must still be right
    # (the ops are called directly, as the autograd wrapper would copy nothing either).
    def shifted(t):
        flat = t.new_empty(t.numel() + 1)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)

    fwd_op, bwd_op, _ = la_ops(target)
    q, k, v, _ = la_inputs(1, 2, 100, 64, 64, F32, target.device)
    args = (None, None, None, 0, False, 1e-6, 1.0)
    want = fwd_op(q, k, v, *args)
    got = fwd_op(shifted(q), shifted(k), shifted(v), *args)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    go = torch.randn_like(v)
    want = bwd_op(go, None, None, q, k, v, want[0], want[3], *args)
    got = bwd_op(shifted(go), None, None, shifted(q), shifted(k), shifted(v), shifted(got[0]), got[3], *args)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


@pytest.mark.parametrize("target", targets(kernels=True))
def test_double_backward_through_a_kernel_raises(target):
    q, k, v, _ = la_inputs(1, 1, 8, 4, 4, F32, target.device)
    q.requires_grad_()
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=target.backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(o.sum(), q, create_graph=True)


# (backend, device, dtype, K, V, message): calls a backend refuses, with its reason, rather than serve wrongly.
REFUSALS = [
    ("triton", "cpu", F32, 0, 8, "head dims"),
    ("triton", "cpu", F32, 8, 0, "head dims"),
    ("triton", "cpu", F64, 16, 16, "float64"),
    ("triton", "cpu", BF16, 16, 16, "bfloat16"),
    ("triton", "cuda", F64, 16, 16, "float64"),
    ("cuda", "cuda", F32, 300, 8, "256"),
]


@pytest.mark.parametrize("backend,device,dtype,K,V,message", [
    pytest.param(*r, marks=[pytest.mark.gpu] if r[1] == "cuda" else []) for r in REFUSALS])
def test_refusals_name_their_reason(backend, device, dtype, K, V, message):
    if backend not in [p.values[0].backend for p in targets(device=device)]:
        pytest.skip(f"{backend} does not run on {device} tensors here")
    q, k, v, _ = la_inputs(1, 2, 5, K, V, dtype, device)
    with pytest.raises(fastml.BackendUnavailable, match=message):
        fastml.causal_linear_attention(q, k, v, backend=backend)
    with pytest.raises(fastml.BackendUnavailable, match=message):
        fastml.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], None, backend=backend)
    if K == 0 or V == 0:  # an empty head dim is served by the reference (and cpp)
        o, st_ = fastml.causal_linear_attention(q, k, v, output_final_state=True, backend="reference")
        assert o.shape == (1, 2, 5, V) and st_.kv.shape == (1, 2, K, V)


# ---- torch.compile ----


def test_ops_compile_fullgraph(target):
    # Varlen with a final state and gradients, the decode step and the non-causal op, traced whole (aot_eager;
    # the layer test below runs inductor). The reference loops over cu_seqlens segments with host-read bounds,
    # so only its fixed-length form traces.
    varlen = target.backend != "reference"
    q, k, v, state = la_inputs(1, 2, 30, 8, 4, F32, target.device, with_state=True, n_seq=2 if varlen else 1)
    cu = torch.tensor([0, 11, 30], device=target.device) if varlen else None

    def f(q, k, v):
        o, st_ = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, cu_seqlens=cu,
                                                output_final_state=True, backend=target.backend)
        first = fastml.LinearAttentionState(st_.kv[:1], st_.z[:1])
        o_t, st2 = fastml.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], first, feature_map="elu+1",
                                                backend=target.backend)
        o_nc = fastml.linear_attention(q, k, v, feature_map="relu")
        return o.square().sum() + st2.kv.sum() + o_t.sum() + o_nc.sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*want).backward()
    for got, exp, name in zip(leaves, want, "qkv"):
        assert_close(got.grad, exp.grad, name=f"d{name}")


def test_layer_in_a_model_compiles_with_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), fastml.nn.CausalLinearAttention(32, 2),
                                torch.nn.Linear(32, 4))
    x = torch.randn(2, 70, 16)
    want = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x), want)


# ---- the layer ----


def test_layer_forward_equals_steps():
    torch.manual_seed(0)
    layer = fastml.nn.CausalLinearAttention(32, 4, dtype=F64)
    x = torch.randn(2, 13, 32, dtype=F64)
    y, state = layer(x, return_state=True)
    s = None
    for t in range(13):
        yt, s = layer.step(x[:, t], s)
        assert_close(yt, y[:, t], name=f"step {t}")
    assert_close(s.kv, state.kv)
    assert_close(s.z, state.z)


def test_layer_learns_to_recall_the_first_token():
    # A task only the recurrent state can solve: every position must output the sequence's first token. The
    # first token carries a marker channel; the layer must learn to key on it and carry its value along. A fixed
    # seed and full-batch Adam make the run deterministic; the loss (about 1 at the start, what predicting zero
    # gives) must fall tenfold (it falls about fiftyfold).
    torch.manual_seed(0)
    B, T, D = 16, 16, 8
    x = torch.randn(B, T, D)
    x[:, :, -1] = 0.0
    x[:, 0, -1] = 4.0  # the marker
    y = x[:, :1, :-1].expand(B, T, D - 1)
    layer = fastml.nn.CausalLinearAttention(D, 2)
    head = torch.nn.Linear(D, D - 1)
    params = list(layer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(80):
        loss = (head(layer(x)) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"

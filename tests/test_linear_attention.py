"""Causal linear attention: the reference against the maths, and the invariants every backend keeps."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastml
from fastml._backend import triton_cpu_error
from fastml.ops.linear_attention import reference
from fastml.testing import assert_close
from la_check import make_inputs

CPU_BACKENDS = ["reference", "cpp"]
# The invariants in float32 hold for the triton backend too, when the interpreter runs it on CPU tensors.
F32_BACKENDS = CPU_BACKENDS + (["triton"] if triton_cpu_error() is None else [])
MAPS = {None: lambda x: x, "elu+1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}


def naive(q, k, v, *, feature_map=None, normalize=True, eps=1e-6, scale=1.0, state=None):
    """The recurrence token by token, in float64: the maths of API.md with nothing clever."""
    phi = MAPS[feature_map] if not callable(feature_map) else feature_map
    q, k, v = (t.double() for t in (q, k, v))
    qf, kf = scale * phi(q), phi(k)
    B, H, T, K = qf.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if state is None else state[0].double().clone()
    z = torch.zeros(B, H, K, dtype=torch.float64) if state is None else state[1].double().clone()
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


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("feature_map,normalize", [(None, False), ("elu+1", True), ("relu", True), ("elu+1", False)])
def test_reference_matches_recurrence(T, feature_map, normalize):
    q, k, v, state = make_inputs(2, 2, T, 16, 12, torch.float64, with_state=True)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7,
                                           initial_state=state, output_final_state=True, backend="reference")
    o2, S, z = naive(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7, state=state)
    assert_close(o, o2, name="o")
    assert_close(fs.kv, S, name="kv")
    assert_close(fs.z, z, name="z")


def test_reference_gradcheck():
    q, k, v, state = make_inputs(1, 2, 70, 5, 3, torch.float64, with_state=True)
    leaves = [t.requires_grad_() for t in (q, k, v, state.kv, state.z)]

    def f(q, k, v, kv, z):
        o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=(kv, z),
                                               output_final_state=True, backend="reference")
        return o, fs.kv, fs.z

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend,dtype", [(b, torch.float32) for b in F32_BACKENDS] +
                         [(b, torch.float64) for b in CPU_BACKENDS])
def test_split_and_resume_equals_whole(backend, dtype):
    q, k, v, _ = make_inputs(2, 3, 150, 16, 16, dtype)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", output_final_state=True, backend=backend)
    o1, s1 = fastml.causal_linear_attention(q[:, :, :77], k[:, :, :77], v[:, :, :77], feature_map="elu+1",
                                            output_final_state=True, backend=backend)
    o2, s2 = fastml.causal_linear_attention(q[:, :, 77:], k[:, :, 77:], v[:, :, 77:], feature_map="elu+1",
                                            initial_state=s1, output_final_state=True, backend=backend)
    assert_close(torch.cat([o1, o2], 2), o, name="o")
    assert_close(s2.kv, fs.kv, name="kv")
    assert_close(s2.z, fs.z, name="z")


@pytest.mark.parametrize("backend", F32_BACKENDS)
def test_cu_seqlens_equals_separate_calls(backend):
    lengths = [5, 0, 64, 70, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, state = make_inputs(1, 2, sum(lengths), 16, 8, torch.float32, with_state=True, n_seq=len(lengths))
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map="relu", initial_state=state, cu_seqlens=cu,
                                           output_final_state=True, backend=backend)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        st_i = fastml.LinearAttentionState(state.kv[i:i + 1], state.z[i:i + 1])
        oi, si = fastml.causal_linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], feature_map="relu",
                                                initial_state=st_i, output_final_state=True, backend=backend)
        assert_close(o[:, :, s:e], oi, name=f"o of segment {i}")
        assert_close(fs.kv[i:i + 1], si.kv, name=f"kv of segment {i}")
        assert_close(fs.z[i:i + 1], si.z, name=f"z of segment {i}")


@pytest.mark.parametrize("backend", F32_BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_step_equals_causal(backend, normalize):
    q, k, v, _ = make_inputs(2, 2, 9, 16, 8, torch.float32)
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", normalize=normalize, backend=backend)
    state = None
    for t in range(q.shape[2]):
        ot, state = fastml.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, feature_map="elu+1",
                                                 normalize=normalize, backend=backend)
        assert_close(ot, o[:, :, t], name=f"o at step {t}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_gradients_match_reference(backend):
    q, k, v, state = make_inputs(2, 2, 1, 8, 4, torch.float64, with_state=True)
    grads = []
    for b in (backend, "reference"):
        leaves = [t[:, :, 0].clone().requires_grad_() for t in (q, k, v)]
        st = fastml.LinearAttentionState(*(t.clone().requires_grad_() for t in state))
        o, ns = fastml.linear_attention_step(*leaves, st, feature_map="elu+1", backend=b)
        (o.sum() + ns.kv.sum() * 0.3 + ns.z.sum() * 0.2).backward()
        grads.append([t.grad for t in leaves + list(st)])
    for a, e in zip(*grads):
        assert_close(a, e, name="step gradient")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_callable_feature_map_changes_dim(backend):
    q, k, v, _ = make_inputs(1, 2, 40, 8, 4, torch.float64)

    def phi(x):
        return torch.cat([torch.relu(x), torch.relu(-x)], -1)  # K -> 2K

    o, fs = fastml.causal_linear_attention(q, k, v, feature_map=phi, output_final_state=True, backend=backend)
    o2, S, _ = naive(q, k, v, feature_map=phi)
    assert fs.kv.shape == (1, 2, 16, 4)
    assert_close(o, o2)
    assert_close(fs.kv, S)


@pytest.mark.parametrize("backend", F32_BACKENDS)
def test_noncontiguous_inputs_and_inputs_untouched(backend):
    x = torch.randn(2, 70, 3, 16)  # [B, T, H, K] viewed as [B, H, T, K]
    q, k, v = x.transpose(1, 2), (x * 0.5).transpose(1, 2), (x - 1).transpose(1, 2)
    before = [t.clone() for t in (q, k, v)]
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=backend)
    want = fastml.causal_linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), feature_map="elu+1",
                                          backend="reference")
    assert_close(o, want)
    for a, b in zip((q, k, v), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", F32_BACKENDS)
def test_nan_in_gives_nan_out(backend):
    # Chunked kernels multiply a masked [C, C] block, so a NaN may reach earlier tokens of its own chunk (0 * NaN);
    # earlier chunks stay clean and every later token is NaN.
    q, k, v, _ = make_inputs(1, 1, 150, 8, 8, torch.float32)
    v[0, 0, 130, 3] = float("nan")
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=backend)
    assert not o[0, 0, :128].isnan().any()
    assert o[0, 0, 130:, 3].isnan().all()
    # Through each feature map (a NaN key feature reaches every later output; a NaN query its own token).
    for fmap in ("elu+1", "relu", None):
        for name in ("q", "k"):
            t = {"q": q.clone(), "k": k.clone(), "v": v[..., :3].clone()}
            t[name][0, 0, 70, 2] = float("nan")
            o = fastml.causal_linear_attention(t["q"], t["k"], t["v"], feature_map=fmap, backend=backend)
            assert not o[0, 0, :64].isnan().any(), (fmap, name)
            assert o[0, 0, 70].isnan().all(), (fmap, name)
            st = fastml.LinearAttentionState(torch.zeros(1, 1, 8, 3), torch.zeros(1, 1, 8))
            o, _ = fastml.linear_attention_step(t["q"][:, :, 70], t["k"][:, :, 70], t["v"][:, :, 70], st,
                                                feature_map=fmap, backend=backend)
            assert o.isnan().all(), (fmap, name, "step")
    # Gradients at a NaN input follow torch: relu's backward passes the gradient there (NaN <= 0 is false).
    qn = q.clone()
    qn[0, 0, 70, 2] = float("nan")
    grads = []
    for b in (backend, "reference"):
        leaf = qn.clone().requires_grad_()
        fastml.causal_linear_attention(leaf, k, v, feature_map="relu", normalize=False, backend=b).sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], equal_nan=True, name="dq")


def test_noncausal_matches_maths():
    q, _, _, _ = make_inputs(2, 2, 7, 8, 4, torch.float64)
    _, k, v, _ = make_inputs(2, 2, 11, 8, 4, torch.float64, seed=3)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 6:] = True
    v[1, :, 8] = float("nan")  # a padded position may hold anything
    o = fastml.linear_attention(q, k, v, feature_map="elu+1", key_padding_mask=mask)
    for b, n in ((0, 11), (1, 6)):
        qf, kf = MAPS["elu+1"](q[b]), MAPS["elu+1"](k[b, :, :n])
        want = (qf @ kf.transpose(-1, -2) @ v[b, :, :n]) / ((qf @ kf.transpose(-1, -2)).sum(-1, keepdim=True) + 1e-6)
        assert_close(o[b], want)


@given(T=st.integers(1, 140), K=st.sampled_from([4, 16, 33]), V=st.sampled_from([3, 16]),
       fmap=st.sampled_from([None, "elu+1", "relu"]), normalize=st.booleans(), cut=st.floats(0, 1))
def test_property_chunked_equals_recurrent_and_resume(T, K, V, fmap, normalize, cut):
    normalize = normalize and fmap is not None  # identity features can make q'.z ~ 0
    q, k, v, state = make_inputs(1, 2, T, K, V, torch.float64, with_state=True, seed=T)
    for backend in CPU_BACKENDS:
        o = fastml.causal_linear_attention(q, k, v, feature_map=fmap, normalize=normalize, initial_state=state,
                                           backend=backend)
        o2, _, _ = naive(q, k, v, feature_map=fmap, normalize=normalize, state=state)
        assert_close(o, o2, name=backend)
        c = int(cut * T)
        _, s1 = fastml.causal_linear_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], feature_map=fmap,
                                               normalize=normalize, initial_state=state, output_final_state=True,
                                               backend=backend)
        o3 = fastml.causal_linear_attention(q[:, :, c:], k[:, :, c:], v[:, :, c:], feature_map=fmap,
                                            normalize=normalize, initial_state=s1, backend=backend)
        assert_close(o3, o[:, :, c:], name=f"{backend} resumed")


def test_layer_forward_equals_steps_and_trains():
    torch.manual_seed(0)
    layer = fastml.nn.CausalLinearAttention(32, 4, dtype=torch.float64)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    y, state = layer(x, return_state=True)
    s = None
    for t in range(13):
        yt, s = layer.step(x[:, t], s)
        assert_close(yt, y[:, t], name=f"step {t}")
    assert_close(s.kv, state.kv)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_layer_in_a_model_compiles():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), fastml.nn.CausalLinearAttention(32, 2),
                                torch.nn.Linear(32, 4))
    x = torch.randn(2, 70, 16)
    want = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x), want)


def test_state_dtype_is_float32_for_half_inputs():
    q, k, v, _ = make_inputs(1, 2, 10, 8, 8, torch.bfloat16)
    o, fs = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", output_final_state=True)
    assert o.dtype == torch.bfloat16 and fs.kv.dtype == torch.float32 and fs.z.dtype == torch.float32
    assert reference.state_dtype(torch.float64) == torch.float64


def test_double_backward_through_a_kernel_raises():
    q, k, v, _ = make_inputs(1, 1, 8, 4, 4, torch.float64)
    q.requires_grad_()
    o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(o.sum(), q, create_graph=True)


@given(lengths=st.lists(st.integers(0, 80), min_size=1, max_size=4), fmap=st.sampled_from([None, "elu+1", "relu"]),
       normalize=st.booleans())
def test_property_cu_seqlens_equals_separate_calls(lengths, fmap, normalize):
    normalize = normalize and fmap is not None
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, state = make_inputs(1, 2, sum(lengths), 8, 5, torch.float64, with_state=True, n_seq=len(lengths),
                                 seed=sum(lengths))
    for backend in CPU_BACKENDS:
        o, fs = fastml.causal_linear_attention(q, k, v, feature_map=fmap, normalize=normalize, initial_state=state,
                                               cu_seqlens=cu, output_final_state=True, backend=backend)
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            st_i = fastml.LinearAttentionState(state.kv[i:i + 1], state.z[i:i + 1])
            oi, si = fastml.causal_linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], feature_map=fmap,
                                                    normalize=normalize, initial_state=st_i, output_final_state=True,
                                                    backend=backend)
            assert_close(o[:, :, s:e], oi, name=f"{backend} o of segment {i}")
            assert_close(fs.kv[i:i + 1], si.kv, name=f"{backend} kv of segment {i}")
            assert_close(fs.z[i:i + 1], si.z, name=f"{backend} z of segment {i}")


@pytest.mark.parametrize("backend,varlen", [("cpp", True), ("reference", False)])
def test_ops_compile_fullgraph(backend, varlen):
    # Varlen with a final state and gradients, the decode step and the non-causal op, traced whole (aot_eager;
    # the layer test above runs inductor). The reference loops over cu_seqlens segments with host-read bounds, so
    # only its fixed-length form traces (README, "Decisions").
    q, k, v, state = make_inputs(1, 2, 30, 8, 4, torch.float32, with_state=True, n_seq=2 if varlen else 1)
    cu = torch.tensor([0, 11, 30]) if varlen else None

    def f(q, k, v):
        o, st = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", initial_state=state, cu_seqlens=cu,
                                               output_final_state=True, backend=backend)
        first = fastml.LinearAttentionState(st.kv[:1], st.z[:1])
        o_t, st2 = fastml.linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], first, feature_map="elu+1",
                                                backend=backend)
        o_nc = fastml.linear_attention(q, k, v, feature_map="relu", backend=backend)
        return o.square().sum() + st2.kv.sum() + o_t.sum() + o_nc.sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*want).backward()
    for got, exp, name in zip(leaves, want, "qkv"):
        assert_close(got.grad, exp.grad, name=f"d{name}")

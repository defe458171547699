"""Every documented bad input raises its documented exception, names the argument, and changes nothing."""
from fractions import Fraction

import pytest
import torch

import fastml
from fastml._backend import triton_cpu_error

B, H, T, K, V = 2, 2, 10, 8, 4


def good():
    return dict(q=torch.randn(B, H, T, K), k=torch.randn(B, H, T, K), v=torch.randn(B, H, T, V))


def state(n=B, k=K, v=V, dtype=torch.float32):
    return fastml.LinearAttentionState(torch.zeros(n, H, k, v, dtype=dtype), torch.zeros(n, H, k, dtype=dtype))


def packed():
    d = good()
    return {n: t[:1] for n, t in d.items()}


CASES = [
    ("q not 4-D", lambda d: d.update(q=d["q"][0]), {}, ValueError, "q"),
    ("v not 4-D", lambda d: d.update(v=d["v"][..., 0]), {}, ValueError, "v"),
    ("q not a tensor", lambda d: d.update(q=d["q"].tolist()), {}, TypeError, "q"),
    ("batch mismatch", lambda d: d.update(k=d["k"][:1]), {}, ValueError, "[B, H]"),
    ("heads mismatch", lambda d: d.update(v=d["v"][:, :1]), {}, ValueError, "[B, H]"),
    ("T mismatch", lambda d: d.update(k=d["k"][:, :, :5], v=d["v"][:, :, :5]), {}, ValueError, "k"),
    ("v T mismatch", lambda d: d.update(v=d["v"][:, :, :5]), {}, ValueError, "v"),
    ("K mismatch", lambda d: d.update(k=d["k"][..., :5]), {}, ValueError, "k"),
    ("integer q", lambda d: d.update(q=d["q"].long()), {}, TypeError, "q"),
    ("mixed dtypes", lambda d: d.update(v=d["v"].double()), {}, TypeError, "v"),
    ("different devices", lambda d: d.update(k=d["k"].to("meta")), {}, ValueError, "k"),
    ("unknown feature_map", None, {"feature_map": "softmax"}, ValueError, "feature_map"),
    ("negative eps", None, {"eps": -1.0}, ValueError, "eps"),
    ("normalize not bool", None, {"normalize": "yes"}, TypeError, "normalize"),
    ("state wrong shape", None, {"initial_state": state(k=K + 1)}, ValueError, "initial_state.kv"),
    ("state wrong batch", None, {"initial_state": state(n=1)}, ValueError, "initial_state.kv"),
    ("state wrong dtype", None, {"initial_state": state(dtype=torch.float16)}, TypeError, "initial_state.kv"),
    ("state not a pair", None, {"initial_state": torch.zeros(B, H, K, V)}, TypeError, "initial_state"),
    ("state z wrong shape", None,
     {"initial_state": fastml.LinearAttentionState(torch.zeros(B, H, K, V), torch.zeros(B, H, K + 1))},
     ValueError, "initial_state.z"),
    ("cu_seqlens with B > 1", None, {"cu_seqlens": torch.tensor([0, 4, T])}, ValueError, "cu_seqlens"),
    ("unknown backend", None, {"backend": "fortran"}, ValueError, "backend"),
]
PACKED_CASES = [
    ("cu_seqlens not starting at 0", {"cu_seqlens": torch.tensor([1, 4, T])}, ValueError),
    ("cu_seqlens decreasing", {"cu_seqlens": torch.tensor([0, 6, 4, T])}, ValueError),
    ("cu_seqlens not ending at T", {"cu_seqlens": torch.tensor([0, 4, T - 1])}, ValueError),
    ("cu_seqlens float", {"cu_seqlens": torch.tensor([0.0, 4.0, T])}, TypeError),
    ("cu_seqlens 2-D", {"cu_seqlens": torch.tensor([[0, 4, T]])}, ValueError),
    ("cu_seqlens too short", {"cu_seqlens": torch.tensor([0])}, ValueError),
    ("cu_seqlens on another device", {"cu_seqlens": torch.tensor([0, 4, T], device="meta")}, ValueError),
    ("state batch not N", {"cu_seqlens": torch.tensor([0, 4, T]), "initial_state": state(n=1)}, ValueError),
]


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if triton_cpu_error() is None else []))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_causal_input(case, backend):
    _, mutate, kwargs, exc, name = case
    d = good()
    if mutate is not None:
        mutate(d)
    before = {n: t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t for n, t in d.items()}
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=None) as info:
        fastml.causal_linear_attention(d["q"], d["k"], d["v"], **kwargs)
    assert name in str(info.value), str(info.value)
    for n, t in d.items():
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            assert torch.equal(t, before[n]), f"{n} was modified"


@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_bad_cu_seqlens(case):
    _, kwargs, exc = case
    d = packed()
    before = {n: t.clone() for n, t in d.items()}
    with pytest.raises(exc) as info:
        fastml.causal_linear_attention(d["q"], d["k"], d["v"], **kwargs)
    assert "cu_seqlens" in str(info.value) or "initial_state" in str(info.value), str(info.value)
    for n, t in d.items():
        assert torch.equal(t, before[n]), f"{n} was modified"


def test_bad_step_inputs():
    q, k, v = torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V)
    with pytest.raises(ValueError, match="q"):
        fastml.linear_attention_step(q[None], k, v, None)
    with pytest.raises(ValueError, match="state.kv"):
        fastml.linear_attention_step(q, k, v, state(k=K + 1))
    with pytest.raises(TypeError, match="state"):
        fastml.linear_attention_step(q, k, v, "state")


def test_bad_noncausal_inputs():
    d = good()
    with pytest.raises(TypeError, match="key_padding_mask"):
        fastml.linear_attention(d["q"], d["k"], d["v"], key_padding_mask=torch.zeros(B, T))
    with pytest.raises(ValueError, match="key_padding_mask"):
        fastml.linear_attention(d["q"], d["k"], d["v"], key_padding_mask=torch.zeros(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="v"):
        fastml.linear_attention(d["q"], d["k"], d["v"][:, :, :3])


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        fastml.nn.CausalLinearAttention(30, 4)
    with pytest.raises(ValueError, match="embed_dim"):
        fastml.nn.CausalLinearAttention(True, 1)
    with pytest.raises(ValueError, match="feature_map"):
        fastml.nn.CausalLinearAttention(8, 2, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        fastml.nn.CausalLinearAttention(8, 2, eps=-1.0)
    layer = fastml.nn.CausalLinearAttention(8, 2)
    with pytest.raises(ValueError, match=r"^x must"):
        layer(torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"^x must"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^x_t must"):
        layer.step(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match=r"^x_t must"):
        layer.step([[0.0] * 8])


def test_real_number_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    d = good()
    for backend in ("reference", "cpp"):
        want = fastml.causal_linear_attention(d["q"], d["k"], d["v"], eps=float(np.float32(1e-3)), scale=0.5,
                                              backend=backend)
        got = fastml.causal_linear_attention(d["q"], d["k"], d["v"], eps=np.float32(1e-3), scale=Fraction(1, 2),
                                             backend=backend)
        assert torch.equal(got, want), backend

"""Every documented bad input raises its documented exception, names the argument, and changes nothing."""
from fractions import Fraction

import pytest
import torch

import fastml
from support import targets

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


# The public functions validate before they pick a backend, so one backend suffices here; the kernel ops' own
# checks are exercised directly below.
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_causal_input(case):
    _, mutate, kwargs, exc, name = case
    d = good()
    if mutate is not None:
        mutate(d)
    before = {n: t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t for n, t in d.items()}
    with pytest.raises(exc) as info:
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


def test_bad_path_inputs():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="baselines"):
        fastml.ig_scale_inputs(x, torch.randn(4, 3), torch.rand(2))
    with pytest.raises(ValueError, match="alphas"):
        fastml.ig_scale_inputs(x, x, torch.rand(2, 1))
    with pytest.raises(ValueError, match="grads"):
        fastml.ig_accumulate(torch.randn(5, 3), x, x, torch.rand(2))
    with pytest.raises(TypeError, match="inputs"):
        fastml.ig_scale_inputs(x.long(), x.long(), torch.rand(2))
    with pytest.raises(ValueError, match="acc"):
        fastml.ig_accumulate(torch.randn(4, 3), x, x, torch.rand(2), acc=torch.zeros(2, 4))


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


# ---- the kernel ops called directly ----
# The registered ops are public too (torch.ops.fastml.*): each checks its arguments itself and raises (a
# RuntimeError from the C++ TORCH_CHECKs) naming the argument, rather than read out of bounds.


def _la_fwd(dev):
    q, k = torch.randn(1, 2, 10, 8, device=dev), torch.randn(1, 2, 10, 8, device=dev)
    return dict(q=q, k=k, v=torch.randn(1, 2, 10, 4, device=dev), kv0=torch.zeros(1, 2, 8, 4, device=dev),
                z0=torch.ones(1, 2, 8, device=dev), cu_seqlens=None, feature_map=1, normalize=True, eps=1e-6, scale=1.0)


def _la_bwd(dev, fwd_op):
    a = _la_fwd(dev)
    o, kv, z, den = fwd_op(*a.values())
    b = dict(grad_o=torch.randn_like(o), grad_kv=torch.randn_like(kv), grad_z=None, q=a["q"], k=a["k"], v=a["v"],
             o=o, den=den)
    b.update((n, a[n]) for n in ("kv0", "z0", "cu_seqlens", "feature_map", "normalize", "eps", "scale"))
    return b


def _la_step(dev):
    a = _la_fwd(dev)
    return dict(q=a["q"][:, :, 0], k=a["k"][:, :, 0], v=a["v"][:, :, 0], kv=a["kv0"], z=a["z0"], feature_map=1,
                normalize=True, eps=1e-6, scale=1.0)


def _ig_scale(dev):
    x = torch.randn(3, 5, device=dev)
    return dict(inputs=x, baselines=torch.zeros_like(x), alphas=torch.rand(2, device=dev))


def _ig_acc(dev):
    a = _ig_scale(dev)
    return dict(grads=torch.randn(6, 5, device=dev), inputs=a["inputs"], baselines=a["baselines"],
                weights=a["alphas"], multiply_by_inputs=True, acc=torch.zeros(3, 5, device=dev))


# (op, argument named in the message, change to the good arguments)
OP_CASES = [
    ("fwd", "q", lambda a: a.update(q=a["q"][0])),
    ("fwd", "k", lambda a: a.update(k=a["k"][..., :5])),
    ("fwd", "v", lambda a: a.update(v=a["v"][:, :, :7])),
    ("fwd", "v", lambda a: a.update(v=a["v"].double())),
    ("fwd", "feature_map", lambda a: a.update(feature_map=3)),
    ("fwd", "feature_map", lambda a: a.update(feature_map=-1)),
    ("fwd", "kv0", lambda a: a.update(kv0=a["kv0"][..., :3])),
    ("fwd", "kv0", lambda a: a.update(kv0=a["kv0"].half())),
    ("fwd", "z0", lambda a: a.update(z0=a["z0"][:, :1])),
    ("fwd", "cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))),
    ("fwd", "cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 9]), kv0=None, z0=None)),
    ("fwd", "cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 6, 4, 10]), kv0=None, z0=None)),
    ("fwd", "cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 40, 10]), kv0=None, z0=None)),
    ("fwd", "cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([[0, 10]]), kv0=None, z0=None)),
    ("bwd", "grad_o", lambda a: a.update(grad_o=a["grad_o"][..., :3])),
    ("bwd", "grad_kv", lambda a: a.update(grad_kv=a["grad_kv"][:, :1])),
    ("bwd", "den", lambda a: a.update(den=a["den"][..., :4])),
    ("bwd", "o", lambda a: a.update(o=a["o"].double())),
    ("bwd", "k", lambda a: a.update(k=a["k"][:, :, :4])),
    ("step", "q", lambda a: a.update(q=a["q"][None])),
    ("step", "v", lambda a: a.update(v=a["v"][:, :1])),
    ("step", "kv", lambda a: a.update(kv=a["kv"][..., :2])),
    ("step", "z", lambda a: a.update(z=a["z"].double())),
    ("step", "feature_map", lambda a: a.update(feature_map=7)),
    ("scale", "baselines", lambda a: a.update(baselines=a["baselines"][:2])),
    ("scale", "baselines", lambda a: a.update(baselines=a["baselines"].double())),
    ("scale", "alphas", lambda a: a.update(alphas=a["alphas"][None])),
    ("scale", "inputs", lambda a: a.update(inputs=a["inputs"].long(), baselines=a["baselines"].long())),
    ("accumulate", "grads", lambda a: a.update(grads=a["grads"][:5])),
    ("accumulate", "grads", lambda a: a.update(grads=a["grads"].double())),
    ("accumulate", "weights", lambda a: a.update(weights=a["weights"][None])),
    ("accumulate", "acc", lambda a: a.update(acc=a["acc"][:2])),
    ("accumulate", "acc", lambda a: a.update(acc=a["acc"].double())),
    ("accumulate", "baselines", lambda a: a.update(baselines=a["baselines"][:1])),
]


def _op_and_args(target, op):
    suffix = "_triton" if target.backend == "triton" else ""
    la = [getattr(torch.ops.fastml, f"linear_attention_{n}{suffix}") for n in ("fwd", "bwd", "step")]
    table = {
        "fwd": (la[0], lambda d: _la_fwd(d)),
        "bwd": (la[1], lambda d: _la_bwd(d, la[0])),
        "step": (la[2], _la_step),
        "scale": (getattr(torch.ops.fastml, "ig_scale_inputs" + suffix), _ig_scale),
        "accumulate": (getattr(torch.ops.fastml, "ig_accumulate" + suffix), _ig_acc),
    }
    fn, make = table[op]
    return fn, make(target.device)


@pytest.mark.parametrize("target", targets(kernels=True))
@pytest.mark.parametrize("op,argname,change", OP_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(OP_CASES)])
def test_kernel_ops_check_their_arguments(target, op, argname, change):
    fn, args = _op_and_args(target, op)
    fn(*args.values())  # the good arguments run
    change(args)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        fn(*args.values())
    assert argname in str(info.value), str(info.value)


@pytest.mark.parametrize("target", targets(kernels=True, device="cuda"))
@pytest.mark.parametrize("op,argname", [("fwd", "k"), ("fwd", "kv0"), ("step", "kv"), ("scale", "alphas"),
                                        ("accumulate", "grads")])
def test_kernel_ops_refuse_mixed_devices(target, op, argname):
    fn, args = _op_and_args(target, op)
    args[argname] = args[argname].cpu()
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn(*args.values())
    assert argname in str(info.value) or "device" in str(info.value), str(info.value)

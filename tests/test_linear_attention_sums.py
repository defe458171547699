"""The state sums behind the sequence-parallel op (C++ kernels, fastml::linear_attention_kv_sum and
fastml::linear_attention_start_grad) against their definitions in float64 torch: every feature map, normalize on
and off, a scale, half-precision inputs, head dims that are not whole vector tiles, one (batch, head) unit on two
threads (its tokens cut into pieces that are summed apart), an empty sequence; opcheck; bad arguments."""
import pytest
import torch

import fastml
from fastml.testing import assert_close, assert_close_norm
from support import BF16, F16, F32, F64

pytestmark = pytest.mark.skipif(not fastml.backends()["cpp"][0], reason="the cpp backend is not built")

OPS = torch.ops.fastml
MAPS = {0: lambda x: x, 1: lambda x: torch.nn.functional.elu(x) + 1, 2: torch.relu}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _inputs(B, H, T, K, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, dtype=F64, generator=g).to(dtype) for d in (K, K, V, V)]


def _sd(dtype):
    return F64 if dtype == F64 else F32


# (B, H, T, K, V, dtype, feature_map, n_threads): pieces need fewer units than threads and >= 2048 tokens.
CASES = [
    (2, 3, 70, 16, 16, F64, 1, 1),
    (1, 1, 3000, 64, 64, F32, 0, 2),
    (1, 1, 2500, 60, 20, F64, 2, 2),
    (2, 2, 129, 32, 48, BF16, 1, 1),
    (1, 2, 65, 64, 64, F16, 2, 2),
    (1, 1, 0, 8, 8, F64, 1, 1),
]


@pytest.mark.parametrize("B,H,T,K,V,dtype,fm,n_threads", CASES)
def test_kv_sum_matches_definition(threads, B, H, T, K, V, dtype, fm, n_threads):
    threads(n_threads)
    _, k, v, _ = _inputs(B, H, T, K, V, dtype, seed=T + K)
    kf = MAPS[fm](k.double())
    kv, z = OPS.linear_attention_kv_sum(k, v, fm)
    assert kv.dtype == z.dtype == _sd(dtype)
    # Sums of thousands of terms of either sign: float32 is checked against the result's norm.
    check = assert_close if dtype == F64 else assert_close_norm
    check(kv.double(), torch.einsum("bhtk,bhtv->bhkv", kf, v.double()), dtype=_sd(dtype), name="kv")
    check(z.double(), kf.sum(2), dtype=_sd(dtype), name="z")


@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (False, 0.5), (True, 0.25)])
@pytest.mark.parametrize("B,H,T,K,V,dtype,fm,n_threads", CASES)
def test_start_grad_matches_autograd(threads, B, H, T, K, V, dtype, fm, n_threads, normalize, scale):
    """The gradient of sum(do * o) with respect to the state a slice started from, against autograd of the
    reference on float64 copies of the same (rounded) inputs."""
    threads(n_threads)
    q, k, v, do = _inputs(B, H, T, K, V, dtype, seed=T + V)
    if fm == 0 and normalize:
        q, k = q.abs(), k.abs()
    sd = _sd(dtype)
    g = torch.Generator().manual_seed(7)
    kv0 = torch.randn(B, H, K, V, dtype=F64, generator=g)
    z0 = torch.rand(B, H, K, dtype=F64, generator=g) + 1.0
    o, _, _, den = OPS.linear_attention_fwd(q, k, v, kv0.to(sd), z0.to(sd), None, fm, normalize, 1e-6, scale)
    dkv, dz = OPS.linear_attention_start_grad(do, q, o, den, fm, normalize, scale)
    s0 = (kv0.clone().requires_grad_(), z0.clone().requires_grad_())
    o64, _, _ = fastml.ops.linear_attention.reference.causal_linear_attention(
        q.double(), k.double(), v.double(), feature_map=fm, normalize=normalize, eps=1e-6, scale=scale,
        initial_state=s0)
    # (+ 0 * the states: an empty slice's loss still depends on them, with zero gradients)
    loss = (o64 * do.double()).sum() + 0 * (s0[0].sum() + s0[1].sum())
    want = torch.autograd.grad(loss, s0)
    check = assert_close if dtype == F64 else assert_close_norm
    check(dkv.double(), want[0], name="dkv", dtype=dtype)
    check(dz.double(), want[1], name="dz", dtype=dtype)


def test_opcheck():
    q, k, v, do = _inputs(1, 2, 40, 16, 8, F32, seed=1)
    torch.library.opcheck(OPS.linear_attention_kv_sum.default, (k, v, 1))
    o, _, _, den = OPS.linear_attention_fwd(q.abs(), k.abs(), v, None, None, None, 1, True, 1e-6, 1.0)
    torch.library.opcheck(OPS.linear_attention_start_grad.default, (do, q.abs(), o, den, 1, True, 1.0))


@pytest.mark.parametrize("call,match", [
    (lambda k, v, o, den: OPS.linear_attention_kv_sum(k[0], v, 0), "4-D"),
    (lambda k, v, o, den: OPS.linear_attention_kv_sum(k, v[:, :, :5], 0), "v must be"),
    (lambda k, v, o, den: OPS.linear_attention_kv_sum(k, v.double(), 0), "dtype"),
    (lambda k, v, o, den: OPS.linear_attention_kv_sum(k, v, 3), "feature_map"),
    (lambda k, v, o, den: OPS.linear_attention_start_grad(v, k, o[:, :, :5], den, 0, True, 1.0), "o must"),
    (lambda k, v, o, den: OPS.linear_attention_start_grad(v, k, o, den[:, :, :5], 0, True, 1.0), "den must"),
    (lambda k, v, o, den: OPS.linear_attention_start_grad(v, k, o, den.double(), 0, True, 1.0), "den must"),
    (lambda k, v, o, den: OPS.linear_attention_start_grad(v.double(), k, o, den, 0, True, 1.0), "dtype"),
])
def test_bad_arguments_raise(call, match):
    q, k, v, _ = _inputs(1, 2, 9, 4, 3, F32, seed=2)
    o, _, _, den = OPS.linear_attention_fwd(q.abs(), k.abs(), v, None, None, None, 0, True, 1e-6, 1.0)
    with pytest.raises(RuntimeError, match=match):
        call(k, v, o, den)


@pytest.mark.parametrize("dtype,fm,normalize,with_grads", [(F64, 1, True, True), (F32, 0, False, False),
                                                           (BF16, 2, True, True)])
def test_bwd_sweeps_equal_the_backward(threads, dtype, fm, normalize, with_grads):
    """The backward's two sweeps run apart (fastml::linear_attention_bwd_sweep) give the one-call backward's results
    bit for bit: the same scans, one (batch, head) unit at a time (one thread, so that the one-call backward does
    not cut the units into segments)."""
    threads(1)
    q, k, v, do = _inputs(2, 3, 150, 24, 40, dtype, seed=5)
    if fm == 0 and normalize:
        q, k = q.abs(), k.abs()
    sd = _sd(dtype)
    g = torch.Generator().manual_seed(3)
    kv0 = torch.randn(2, 3, 24, 40, generator=g).to(sd)
    z0 = (torch.rand(2, 3, 24, generator=g) + 1).to(sd)
    gkv, gz = (torch.randn(2, 3, 24, 40, generator=g).to(sd), torch.randn(2, 3, 24, generator=g).to(sd)) \
        if with_grads else (None, None)
    args = (fm, normalize, 1e-6, 0.5)
    o, _, _, den = OPS.linear_attention_fwd(q, k, v, kv0, z0, None, *args)
    full = OPS.linear_attention_bwd(do, gkv, gz, q, k, v, o, den, kv0, z0, None, *args)
    first = OPS.linear_attention_bwd_sweep(do, None, None, q, k, v, o, den, kv0, z0, *args, 0)
    second = OPS.linear_attention_bwd_sweep(do, gkv, gz, q, k, v, o, den, kv0, z0, *args, 1)
    assert torch.equal(first[0], full[0]), "dq"
    assert all(t.numel() == 0 for t in first[1:]) and second[0].numel() == 0
    for name, a, b in zip(("dk", "dv", "dkv0", "dz0"), second[1:], full[1:]):
        assert torch.equal(a, b), name
    torch.library.opcheck(OPS.linear_attention_bwd_sweep.default, (do, gkv, gz, q, k, v, o, den, kv0, z0, *args, 1))
    with pytest.raises(ValueError, match="sweep must be 0 or 1"):
        OPS.linear_attention_bwd_sweep(do, gkv, gz, q, k, v, o, den, kv0, z0, *args, 2)

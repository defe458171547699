"""Gaussian latent ops: gaussian_kl / gaussian_sample_kl over every backend this machine runs (closed forms in
float64, the counter-based noise, sample moments, gradients against autograd of the reference, extreme log
variances, half inputs, what the kernels save, opcheck, torch.compile, bad inputs), and the composite NVAE devices
(kl_warmup, kl_balance, spectral_penalty)."""
import math

import pytest
import torch

import fastml
from fastml.ops.gaussian import reference
from fastml.testing import assert_close
from support import targets

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(params=targets(device="cpu"))
def target(request):
    """The CPU targets (this suite builds CPU tensors; the CUDA path has its own test at the end)."""
    return request.param
REDUCTIONS = ("none", "per_sample", "sum", "batchmean")


def _inputs(shape, dtype=F64, *, prior=(False, False), seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g, dtype=F64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    mu, lv = mk(), mk()
    pm = mk() if prior[0] else None
    plv = mk() if prior[1] else None
    return mu, lv, pm, plv


def _torch_kl(mu, lv, pm, plv):
    """KL from torch.distributions, a formula written independently of ours."""
    pm = torch.zeros_like(mu) if pm is None else pm
    plv = torch.zeros_like(mu) if plv is None else plv
    q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(pm, torch.exp(0.5 * plv))
    return torch.distributions.kl_divergence(q, p)


def _reduce(kl, reduction):
    if reduction == "none":
        return kl
    per = kl.reshape(kl.shape[0], -1).sum(1)
    return {"per_sample": per, "sum": per.sum(), "batchmean": per.sum() / kl.shape[0]}[reduction]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [(False, False), (True, True), (False, True)])
def test_kl_closed_form(target, prior, reduction):
    mu, lv, pm, plv = _inputs((3, 4, 5), prior=prior, requires_grad=False)
    got = fastml.gaussian_kl(mu, lv, pm, plv, reduction=reduction, backend=target.backend)
    assert_close(got, _reduce(_torch_kl(mu, lv, pm, plv), reduction))
    # residual: mu, logvar are offsets from the prior; equal to the explicit posterior N(pm + mu, var_p * exp(lv))
    pm0 = torch.zeros_like(mu) if pm is None else pm
    plv0 = torch.zeros_like(mu) if plv is None else plv
    res = fastml.gaussian_kl(mu, lv, pm, plv, residual=True, reduction=reduction, backend=target.backend)
    assert_close(res, _reduce(_torch_kl(pm0 + mu, plv0 + lv, pm, plv), reduction))
    closed = 0.5 * (mu**2 / plv0.exp() + lv.exp() - 1 - lv)
    assert_close(res, _reduce(closed, reduction))


def test_sample_is_the_counter_based_noise(target):
    mu, lv, pm, plv = _inputs((4, 33), prior=(True, True), requires_grad=False)
    for residual in (False, True):
        g = torch.Generator().manual_seed(5)
        seed = torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64)
        e = reference.standard_normal(mu.numel(), seed).reshape(mu.shape)
        g = torch.Generator().manual_seed(5)
        z, kl = fastml.gaussian_sample_kl(mu, lv, pm, plv, residual=residual, temperature=0.7, generator=g,
                                          backend=target.backend)
        mean, lvq = (pm + mu, plv + lv) if residual else (mu, lv)
        assert_close(z, mean + 0.7 * torch.exp(0.5 * lvq) * e)
        assert_close(kl, fastml.gaussian_kl(mu, lv, pm, plv, residual=residual, backend="reference"))


def test_noise_matches_the_reference_in_float32(target):
    mu = torch.zeros(3, 1001)
    g = torch.Generator().manual_seed(11)
    z, _ = fastml.gaussian_sample_kl(mu, mu.clone(), generator=g, backend=target.backend)
    g = torch.Generator().manual_seed(11)
    seed = torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64)
    assert_close(z, reference.standard_normal(mu.numel(), seed).reshape(mu.shape).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_sample_moments(target):
    # 2^16 (cpp) or 2^13 (interpreter) draws of N(1.5, 4) at a fixed seed: mean and variance within 5 standard errors.
    n = 1 << (13 if target.backend == "triton" else 16)
    mu = torch.full((8, n // 8), 1.5)
    lv = torch.full((8, n // 8), math.log(4.0))
    z, _ = fastml.gaussian_sample_kl(mu, lv, generator=torch.Generator().manual_seed(0), backend=target.backend)
    z = z.double().reshape(-1)
    se_mean, se_var = math.sqrt(4.0 / n), 4.0 * math.sqrt(2.0 / n)
    assert abs(z.mean().item() - 1.5) < 5 * se_mean
    assert abs(z.var().item() - 4.0) < 5 * se_var
    e = (z - 1.5) / 2
    # the two halves of each Box-Muller pair are uncorrelated; 4th moment of a normal is 3
    assert abs(torch.corrcoef(torch.stack((e[0::2], e[1::2])))[0, 1].item()) < 5 / math.sqrt(n / 2)
    assert abs((e**4).mean().item() - 3.0) < 5 * math.sqrt(96.0 / n)
    # another draw from the same generator gives other noise; the same state gives the same noise
    g = torch.Generator().manual_seed(0)
    z1, _ = fastml.gaussian_sample_kl(mu, lv, generator=g, backend=target.backend)
    z2, _ = fastml.gaussian_sample_kl(mu, lv, generator=g, backend=target.backend)
    assert torch.equal(z1.double().reshape(-1), z) and not torch.equal(z1, z2)


@pytest.mark.parametrize("target", targets(kernels=True))
@pytest.mark.parametrize("reduction", ["none", "per_sample", "batchmean"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("prior", [(False, False), (True, True), (True, False)])
def test_gradients_match_the_reference(target, prior, residual, reduction):
    mu, lv, pm, plv = _inputs((3, 2, 5), prior=prior, seed=1)
    leaves = [t for t in (mu, lv, pm, plv) if t is not None]
    out = {}
    for backend in ("reference", target.backend):
        g = torch.Generator().manual_seed(2)
        z, kl = fastml.gaussian_sample_kl(mu, lv, pm, plv, residual=residual, temperature=0.8, generator=g,
                                          reduction=reduction, backend=backend)
        w = torch.linspace(-1, 1, kl.numel(), dtype=F64).reshape(kl.shape)
        loss = (z * torch.cos(z)).sum() + (kl * w).sum() + (kl**2).sum()
        out[backend] = torch.autograd.grad(loss, leaves)
    for a, b in zip(out[target.backend], out["reference"]):
        assert_close(a, b)
    # KL only (no gradient for z): the backward skips the noise
    kl_ref = fastml.gaussian_kl(mu, lv, pm, plv, residual=residual, reduction=reduction, backend="reference")
    kl_k = fastml.gaussian_kl(mu, lv, pm, plv, residual=residual, reduction=reduction, backend=target.backend)
    # (the residual KL does not depend on the prior's mean: its gradient is zero, or None from the reference)
    ga = torch.autograd.grad(kl_k.sum(), leaves, allow_unused=True)
    gb = torch.autograd.grad(kl_ref.sum(), leaves, allow_unused=True)
    for a, b, t in zip(ga, gb, leaves):
        assert_close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if b is None else b)


@pytest.mark.parametrize("target", targets(kernels=True))
def test_broadcast_prior_gradients(target):
    mu, lv, _, _ = _inputs((4, 3, 6), seed=3)
    pm = torch.randn(3, 1, dtype=F64, requires_grad=True)
    plv = torch.randn(1, 6, dtype=F64, requires_grad=True)
    grads = []
    for backend in ("reference", target.backend):
        z, kl = fastml.gaussian_sample_kl(mu, lv, pm, plv, generator=torch.Generator().manual_seed(0),
                                          backend=backend)
        grads.append(torch.autograd.grad(z.pow(2).sum() + kl.sum(), (mu, lv, pm, plv)))
    for a, b in zip(*grads):
        assert_close(a, b)


def test_extreme_log_variances(target):
    lv = torch.tensor([[-300.0, -100.0, -20.0, 0.0, 20.0, 80.0]], requires_grad=True)
    mu = torch.zeros_like(lv, requires_grad=True)
    kl = fastml.gaussian_kl(mu, lv, reduction="none", backend=target.backend)
    expected = 0.5 * (lv.detach().double().exp() - 1 - lv.detach().double())
    assert_close(kl, expected.float())
    kl.sum().backward()
    assert torch.isfinite(lv.grad).all() and torch.isfinite(mu.grad).all()
    # beyond float32's range the KL overflows to inf, never NaN
    big = fastml.gaussian_kl(torch.zeros(1, 2), torch.tensor([[95.0, 300.0]]), backend=target.backend)
    assert torch.isinf(big).all() and (big > 0).all()
    # prior and posterior both huge: a difference of log variances, not inf / inf
    plv = torch.full((1, 2), 200.0)
    kl = fastml.gaussian_kl(torch.zeros(1, 2), plv + 1.0, None, plv, backend=target.backend)
    assert_close(kl, torch.tensor([0.5 * (math.exp(1.0) - 2.0) * 2]))


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_inputs_are_computed_in_float32(target, dtype):
    if target.backend == "triton" and dtype == BF16:
        pytest.skip("bfloat16 is not run under the interpreter")
    # log variances around 15: exp(15) = 3.3e6 overflows float16 (max 65504) but not float32
    mu = (torch.randn(4, 64) * 3).to(dtype)
    lv = (torch.randn(4, 64) + 15).to(dtype)
    kl = fastml.gaussian_kl(mu, lv, backend=target.backend)
    assert kl.dtype == F32
    assert_close(kl, fastml.gaussian_kl(mu.double(), lv.double(), backend="reference").float(), rtol=1e-5, atol=1e-3)
    z, kl = fastml.gaussian_sample_kl(mu.requires_grad_(), lv.requires_grad_(), reduction="sum",
                                      generator=torch.Generator().manual_seed(0), backend=target.backend)
    assert z.dtype == dtype and torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(mu.grad.float()).all()


def test_soft_clamp(target):
    mu = torch.tensor([[-1e4, -3.0, 0.5, 3.0, 1e4]], dtype=F64, requires_grad=True)
    lv = mu.detach().clone().requires_grad_(True)
    z, kl = fastml.gaussian_sample_kl(mu, lv, soft_clamp=5.0, temperature=0.0, reduction="none",
                                      backend=target.backend)
    c_mu = 5.0 * torch.tanh(mu.detach() / 5.0)
    assert_close(z, c_mu)
    assert_close(kl, fastml.gaussian_kl(c_mu, c_mu, reduction="none", backend="reference"))
    assert z.abs().max() <= 5.0
    kl.sum().backward()
    assert torch.isfinite(mu.grad).all()
    assert_close(fastml.soft_clamp(mu.detach(), 5.0), c_mu)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_kernels_save_only_inputs_and_seed(target):
    mu, lv, _, _ = _inputs((4, 50), dtype=F32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, kl = fastml.gaussian_sample_kl(mu, lv, backend=target.backend)
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == 2 and {t.data_ptr() for t in big} == {mu.data_ptr(), lv.data_ptr()}
    assert sum(t.numel() for t in saved if t.numel() <= 1) == 1  # the seed


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_double_backward_raises(target):
    mu, lv, _, _ = _inputs((2, 3))
    kl = fastml.gaussian_kl(mu, lv, backend=target.backend).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(kl, mu, create_graph=True)


def _ops(target):
    suffix = "_triton" if target.backend == "triton" else ""
    return getattr(torch.ops.fastml, "gaussian_kl_fwd" + suffix), getattr(torch.ops.fastml, "gaussian_kl_bwd" + suffix)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_opcheck(target):
    fwd, bwd = _ops(target)
    mu, lv, pm, plv = _inputs((3, 7), dtype=F32, prior=(True, True), requires_grad=False)
    seed = torch.tensor([12345], dtype=torch.int64)
    for args in [(mu, lv, pm, plv, seed, False, 0.5, False), (mu, lv, None, None, None, True, 1.0, True),
                 (mu, lv, None, plv, seed, True, 1.0, True)]:
        torch.library.opcheck(fwd.default, args)
    torch.library.opcheck(bwd.default, (torch.randn(3, 7), torch.randn(3), mu, lv, pm, plv, seed, False, 0.5, False))
    torch.library.opcheck(bwd.default, (None, torch.randn(3, 7), mu, lv, None, None, None, True, 1.0, True))


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_kernel_op_rejects_bad_arguments(target):
    fwd, _ = _ops(target)
    mu = torch.randn(3, 4)
    with pytest.raises((ValueError, RuntimeError), match="logvar"):
        fwd(mu, torch.randn(3, 5), None, None, None, False, 1.0, False)
    with pytest.raises((TypeError, RuntimeError), match="seed"):
        fwd(mu, mu, None, None, torch.tensor([1.0]), False, 1.0, False)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_torch_compile(target):
    mu, lv, pm, plv = _inputs((4, 6), dtype=F32, prior=(True, True))

    def f(mu, lv, pm, plv):
        return fastml.gaussian_kl(mu, lv, pm, plv, reduction="batchmean", backend=target.backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(mu, lv, pm, plv)
    assert_close(got, f(mu, lv, pm, plv))
    g1 = torch.autograd.grad(got, (mu, lv, pm, plv))
    g2 = torch.autograd.grad(f(mu, lv, pm, plv), (mu, lv, pm, plv))
    for a, b in zip(g1, g2):
        assert_close(a, b)

    def s(mu, lv, g):
        z, kl = fastml.gaussian_sample_kl(mu, lv, generator=g, backend=target.backend)
        return z.sum() + kl.sum()

    assert_close(torch.compile(s, backend="eager")(mu, lv, torch.Generator().manual_seed(3)),
                 s(mu, lv, torch.Generator().manual_seed(3)))


def test_bad_inputs():
    mu = torch.randn(3, 4)
    with pytest.raises(ValueError, match="logvar"):
        fastml.gaussian_kl(mu, torch.randn(3, 5))
    with pytest.raises(TypeError, match="mu"):
        fastml.gaussian_kl(torch.ones(3, 4, dtype=torch.int64), mu)
    with pytest.raises(TypeError, match="logvar"):
        fastml.gaussian_sample_kl(mu, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="logvar"):
        fastml.gaussian_kl(mu, mu.double())
    with pytest.raises(ValueError, match="prior_mu"):
        fastml.gaussian_kl(mu, mu, torch.randn(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        fastml.gaussian_kl(mu, mu, reduction="mean")
    with pytest.raises(ValueError, match="mu"):
        fastml.gaussian_kl(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="soft_clamp"):
        fastml.gaussian_sample_kl(mu, mu, soft_clamp=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastml.gaussian_sample_kl(mu, mu, temperature=-1.0)
    with pytest.raises(TypeError, match="generator"):
        fastml.gaussian_sample_kl(mu, mu, generator=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        fastml.kl_warmup(3, warmup_steps=0)
    with pytest.raises(ValueError, match="min_coeff"):
        fastml.kl_warmup(3, warmup_steps=10, min_coeff=2.0)
    with pytest.raises(ValueError, match="alpha"):
        fastml.kl_balance(torch.rand(3, 4), kl_coeff=0.5, alpha=torch.ones(2))
    with pytest.raises(ValueError, match="kl_groups"):
        fastml.kl_balance([torch.rand(4), torch.rand(5)], kl_coeff=0.5)
    with pytest.raises(ValueError, match="weights"):
        fastml.spectral_penalty(torch.randn(5))
    with pytest.raises(ValueError, match="n_power_iterations"):
        fastml.spectral_penalty(torch.randn(5, 3), n_power_iterations=0)


def test_kl_warmup():
    f = lambda s: fastml.kl_warmup(s, warmup_steps=100, constant_steps=20, min_coeff=1e-3)  # noqa: E731
    assert f(0) == 1e-3 and f(20) == 1e-3 and f(21) == pytest.approx(0.01)
    assert f(70) == pytest.approx(0.5) and f(120) == 1.0 and f(10_000) == 1.0
    assert fastml.kl_warmup(0, warmup_steps=10) == 1e-4


def test_kl_balance():
    kl = torch.tensor([[1.0, 3.0], [10.0, 30.0], [0.0, 0.0]], requires_grad=True)
    alpha = torch.tensor([1.0, 2.0, 1.0])
    total, coeff = fastml.kl_balance(kl, kl_coeff=0.5, alpha=alpha)
    raw = torch.tensor([2.01 / 1.0, 20.01 / 2.0, 0.01 / 1.0])
    assert_close(coeff, raw / raw.mean())
    assert not coeff.requires_grad and coeff.mean().item() == pytest.approx(1.0)
    assert_close(total, 0.5 * (coeff[:, None] * kl.detach()).sum(0))
    total.sum().backward()
    assert_close(kl.grad, 0.5 * coeff[:, None].expand(3, 2))
    listed, c2 = fastml.kl_balance(list(kl.detach()), kl_coeff=0.5, alpha=alpha)
    assert_close(listed, total.detach()) and torch.equal(c2, coeff)
    total, coeff = fastml.kl_balance(kl, kl_coeff=1.0)
    assert torch.equal(coeff, torch.ones(3)) and torch.equal(total, kl.detach().sum(0))


def test_spectral_penalty():
    g = torch.Generator().manual_seed(0)
    lin = torch.randn(20, 12, generator=g, dtype=F64, requires_grad=True)
    conv = torch.randn(8, 3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    exact = torch.linalg.matrix_norm(lin, ord=2) + torch.linalg.matrix_norm(conv.reshape(8, -1), ord=2)
    pen, state = fastml.spectral_penalty([lin, conv], n_power_iterations=200)
    assert_close(pen, exact.detach(), rtol=1e-8, atol=0)
    # one iteration per call, the state carried: converges across calls; the caller's state is left as it was
    state1 = None
    for _ in range(200):
        pen1, new = fastml.spectral_penalty([lin, conv], state=state1)
        if state1 is not None:
            assert new is not state1
        state1 = new
    assert_close(pen1, exact.detach(), rtol=1e-8, atol=0)
    # gradient u v^T, the top singular vectors
    (grad,) = torch.autograd.grad(pen, lin)
    U, S, Vh = torch.linalg.svd(lin.detach())
    # (u, v) and (-u, -v) are the same pair: u v^T has no sign ambiguity
    assert_close(grad, torch.outer(U[:, 0], Vh[0]), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="state"):
        fastml.spectral_penalty(torch.randn(5, 4, dtype=F64), state=state)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_auto_matches_reference(dtype):
    """What auto runs on CUDA (triton) against the reference, values and gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    mu, lv, pm, plv = (torch.randn(8, 4, 32, 32, device="cuda", generator=g).to(dtype).requires_grad_()
                       for _ in range(4))
    out = {}
    for backend in ("auto", "reference"):
        z, kl = fastml.gaussian_sample_kl(mu, lv, pm, plv, residual=True, generator=torch.Generator(
            device="cuda").manual_seed(1), backend=backend)
        out[backend] = (z, kl, torch.autograd.grad(z.float().pow(2).sum() + kl.sum(), (mu, lv, pm, plv)))
    a, b = out["auto"], out["reference"]
    assert_close(a[0], b[0], dtype=dtype)
    assert_close(a[1], b[1], rtol=1e-4, atol=1e-2)
    for x, y in zip(a[2], b[2]):
        assert_close(x, y, dtype=dtype)


def test_non_contiguous_inputs(target):
    base = torch.randn(5, 3, 4, dtype=F64)
    mu = base.transpose(1, 2)  # [5, 4, 3] view
    lv = torch.randn(5, 3, 4, dtype=F64).transpose(1, 2)
    z, kl = fastml.gaussian_sample_kl(mu, lv, generator=torch.Generator().manual_seed(0), backend=target.backend)
    z2, kl2 = fastml.gaussian_sample_kl(mu.contiguous(), lv.contiguous(), generator=torch.Generator().manual_seed(0),
                                        backend=target.backend)
    assert torch.equal(z, z2) and torch.equal(kl, kl2)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu")[:1])
def test_cpu_results_do_not_depend_on_the_thread_count(target):
    mu, lv, _, _ = _inputs((3, 40000), dtype=F32, requires_grad=False)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(fastml.gaussian_sample_kl(mu, lv, generator=torch.Generator().manual_seed(0),
                                                 backend=target.backend))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])

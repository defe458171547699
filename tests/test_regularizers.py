"""Regularizers: softmax_kl over every backend this machine runs (float64 reference values and gradients, masked
classes, half inputs, opcheck, torch.compile, bad inputs), gradient_penalty_backward in both modes (including a
model whose fastml kernel has no double backward), vat_loss (the Hessian's top eigenvector, no gradients left in
the parameters, batch-norm statistics untouched) and noise_consistency."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastml
from fastml.ops.regularizers import _vat_direction
from fastml.testing import assert_close
from support import targets

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(params=targets(device="cpu"))
def target(request):
    """The CPU targets (this suite builds CPU tensors; the CUDA path has its own test at the end)."""
    return request.param


def _logits(N, C, dtype=F64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(N, C, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()
    q = (torch.randn(N, C, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()
    return p, q


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 1500)])
def test_softmax_kl_values_and_gradients(target, shape, reduction):
    p, q = _logits(*shape)
    got = fastml.softmax_kl(p, q, reduction=reduction, temperature=1.7, backend=target.backend)
    # torch's own KL, written independently of ours
    rows = F.kl_div(F.log_softmax(q / 1.7, -1), F.log_softmax(p / 1.7, -1), log_target=True,
                    reduction="none").sum(-1)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / shape[0]}[reduction]
    assert_close(got, expected)
    w = torch.linspace(0.5, 2, got.numel(), dtype=F64).reshape(got.shape)
    ga = torch.autograd.grad((got * w).sum(), (p, q))
    gb = torch.autograd.grad((expected * w).sum(), (p, q))
    for a, b in zip(ga, gb):
        assert_close(a, b)


@pytest.mark.parametrize("target", targets(kernels=True))
def test_softmax_kl_second_backward_and_output_gradient(target):
    p, q = _logits(4, 9)
    out = fastml.softmax_kl(p, q, backend=target.backend)
    ref = fastml.softmax_kl(p, q, backend="reference")
    for scale in (1.0, 3.0):  # the fused buffers, then the recomputation through the retained graph
        ga = torch.autograd.grad(out * scale, (p, q), retain_graph=True)
        gb = torch.autograd.grad(ref * scale, (p, q), retain_graph=True)
        for a, b in zip(ga, gb):
            assert_close(a, b)
    # only q requires grad (VAT's case)
    pd = p.detach()
    (gq,) = torch.autograd.grad(fastml.softmax_kl(pd, q, backend=target.backend), q)
    (gr,) = torch.autograd.grad(fastml.softmax_kl(pd, q, backend="reference"), q)
    assert_close(gq, gr)


def test_softmax_kl_masked_classes(target):
    p = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [1.0, -math.inf, 0.0, 0.5]], dtype=F64, requires_grad=True)
    q = torch.tensor([[0.5, 0.0, -math.inf, 1.0], [0.0, 3.0, 1.0, -1.0]], dtype=F64, requires_grad=True)
    got = fastml.softmax_kl(p, q, reduction="none", backend=target.backend)
    P, Q = p.detach().softmax(-1), q.detach().softmax(-1)
    expected = torch.where(P > 0, P * (P.log() - Q.log()), torch.zeros_like(P)).sum(-1)
    assert_close(got, expected)
    got.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert p.grad[0, 2] == 0 and q.grad[0, 2] == 0


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_softmax_kl_half_inputs(target, dtype):
    if target.backend == "triton" and dtype == BF16:
        pytest.skip("bfloat16 is not run under the interpreter")
    p, q = _logits(6, 300, dtype=dtype, scale=8.0)
    got = fastml.softmax_kl(p, q, backend=target.backend)
    assert got.dtype == F32
    assert_close(got, fastml.softmax_kl(p.double(), q.double(), backend="reference").float(), rtol=1e-5, atol=1e-5)
    got.backward()
    assert p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all()


def _sk_ops(target):
    suffix = "_triton" if target.backend == "triton" else ""
    return getattr(torch.ops.fastml, "softmax_kl_fwd" + suffix), getattr(torch.ops.fastml, "softmax_kl_bwd" + suffix)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_softmax_kl_opcheck(target):
    fwd, bwd = _sk_ops(target)
    p, q = (t.detach().float() for t in _logits(5, 33))
    torch.library.opcheck(fwd.default, (p, q, 1.5, 0.2, True))
    torch.library.opcheck(fwd.default, (p, q, 1.0, 1.0, False))
    _, stats, _, _ = fwd(p, q, 1.5, 1.0, False)
    torch.library.opcheck(bwd.default, (torch.randn(5), p, q, stats, 1.5))
    with pytest.raises((ValueError, RuntimeError), match="q_logits"):
        fwd(p, torch.randn(5, 34), 1.0, 1.0, False)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        fwd(p, q, 0.0, 1.0, False)


@pytest.mark.parametrize("target", targets(kernels=True, device="cpu"))
def test_softmax_kl_torch_compile(target):
    p, q = (t.detach().float().requires_grad_() for t in _logits(6, 40))

    def f(p, q):
        return fastml.softmax_kl(p, q, temperature=2.0, backend=target.backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(p, q)
    assert_close(got, f(p, q))
    for a, b in zip(torch.autograd.grad(got * 2, (p, q)), torch.autograd.grad(f(p, q) * 2, (p, q))):
        assert_close(a, b)


def test_softmax_kl_bad_inputs():
    p = torch.randn(4, 5)
    with pytest.raises(ValueError, match="q_logits"):
        fastml.softmax_kl(p, torch.randn(4, 6))
    with pytest.raises(TypeError, match="p_logits"):
        fastml.softmax_kl(torch.ones(4, 5, dtype=torch.int64), p)
    with pytest.raises(ValueError, match="p_logits"):
        fastml.softmax_kl(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        fastml.softmax_kl(p, p, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fastml.softmax_kl(p, p, reduction="mean")


# ---- gradient penalty ----


def _mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_penalty_double_backward_is_the_explicit_gradient():
    model = _mlp()
    x = torch.randn(8, 6, dtype=F64)
    y = torch.randint(0, 3, (8,))
    loss_fn = lambda xx: F.cross_entropy(model(xx), y)  # noqa: E731
    L, pen = fastml.gradient_penalty_backward(loss_fn, x, weight=0.3, mode="double_backward")
    got = _grads(model)
    model.zero_grad()
    xx = x.clone().requires_grad_()
    loss = loss_fn(xx)
    (g,) = torch.autograd.grad(loss, xx, create_graph=True)
    (loss + 0.3 * 0.5 * g.pow(2).sum()).backward()
    for a, b in zip(got, _grads(model)):
        assert_close(a, b)
    assert_close(L, loss.detach())
    assert_close(pen, 0.5 * g.detach().pow(2).sum())
    assert x.grad is None and not L.requires_grad


def test_gradient_penalty_finite_difference_matches_double_backward():
    model = _mlp(1)
    x = torch.randn(8, 6, dtype=F64)
    y = torch.randint(0, 3, (8,))
    loss_fn = lambda xx: F.cross_entropy(model(xx), y)  # noqa: E731
    fastml.gradient_penalty_backward(loss_fn, x, weight=2.0, mode="double_backward")
    exact = _grads(model)
    model.zero_grad()
    L, pen = fastml.gradient_penalty_backward(loss_fn, x, weight=2.0, mode="finite_difference", h=1e-4)
    fd = _grads(model)
    for a, b in zip(fd, exact):
        assert (a - b).norm() <= 1e-3 * b.norm()
    # the penalty matters: the gradient differs from the plain one by more than the tolerance
    model.zero_grad()
    loss_fn(x).backward()
    assert sum((a - b).norm() for a, b in zip(_grads(model), exact)) > 1e-2 * sum(b.norm() for b in exact)
    # accumulation: a second call adds the same again
    model.zero_grad()
    for _ in range(2):
        fastml.gradient_penalty_backward(loss_fn, x, weight=2.0, h=1e-4)
    for a, b in zip(_grads(model), fd):
        assert_close(a, 2 * b)


class _AttentionModel(torch.nn.Module):
    """A one-layer linear-attention model whose attention runs in a fastml kernel (no double backward)."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 1)
        self.backend = backend

    def forward(self, x):  # x [B, T, 8]
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        o = fastml.causal_linear_attention(q, k, v, feature_map="elu+1", backend=self.backend)
        return self.out(o.transpose(1, 2).reshape(B, T, 8)).mean()


def test_gradient_penalty_finite_difference_through_a_kernel_without_double_backward():
    x = torch.randn(2, 6, 8)
    kernel = _AttentionModel("cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        fastml.gradient_penalty_backward(kernel, x, weight=1.0, mode="double_backward")
    kernel.zero_grad()
    fastml.gradient_penalty_backward(kernel, x, weight=1.0, mode="finite_difference", h=1e-2)
    # the same model on the reference backend, penalized by double backward: within the O(h) error
    ref = _AttentionModel("reference")
    fastml.gradient_penalty_backward(ref, x, weight=1.0, mode="double_backward")
    for a, b in zip(_grads(kernel), _grads(ref)):
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6


def test_gradient_penalty_bad_inputs():
    model = _mlp()
    x = torch.randn(4, 6, dtype=F64)
    f = lambda xx: model(xx).sum()  # noqa: E731
    with pytest.raises(ValueError, match="h"):
        fastml.gradient_penalty_backward(f, x, weight=1.0, h=0.0)
    with pytest.raises(ValueError, match="h"):
        fastml.gradient_penalty_backward(f, x, weight=1.0, h=-1e-3)
    with pytest.raises(ValueError, match="mode"):
        fastml.gradient_penalty_backward(f, x, weight=1.0, mode="exact")
    with pytest.raises(TypeError, match="inputs"):
        fastml.gradient_penalty_backward(f, torch.ones(4, 6, dtype=torch.int64), weight=1.0)
    with pytest.raises(ValueError, match="loss_fn"):
        fastml.gradient_penalty_backward(lambda xx: model(xx), x, weight=1.0)
    with pytest.raises(TypeError, match="weight"):
        fastml.gradient_penalty_backward(f, x, weight="big")


# ---- VAT ----


def test_vat_direction_is_the_top_hessian_eigenvector():
    torch.manual_seed(0)
    W = torch.randn(4, 5, dtype=F64)
    model = lambda x: x @ W.T  # noqa: E731  (KL(p(x) || p(x + r)) is quadratic in r near 0)
    x = torch.randn(2, 5, dtype=F64)
    p = model(x).detach()
    d = _vat_direction(model, x, p, 1e-6, 60, torch.Generator().manual_seed(0))
    for i in range(2):
        H = torch.autograd.functional.hessian(
            lambda r: fastml.softmax_kl(p[i:i + 1], model(x[i:i + 1] + r), backend="reference"),
            torch.zeros(1, 5, dtype=F64)).reshape(5, 5)
        evals, evecs = torch.linalg.eigh(H)
        top = evecs[:, -1]
        assert abs(torch.dot(d[i], top).item()) > 1 - 1e-6
        assert d[i].norm().item() == pytest.approx(1.0)


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(5, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.l2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


def test_vat_leaves_no_gradients_and_no_batch_norm_statistics():
    model = _BNNet().train()
    x = torch.randn(16, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = fastml.vat_loss(model, x, eps=0.5, n_power_iterations=2, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()  # the graph survives the statistics being put back
    assert all(p.grad is not None for p in model.parameters())
    # with logits given the model is not run at x; same direction from the same generator state
    logits = model(x).detach()
    for k, v in model.state_dict().items():
        model.state_dict()[k].copy_(before[k])
    l2 = fastml.vat_loss(model, x, logits=logits, eps=0.5, n_power_iterations=2,
                         generator=torch.Generator().manual_seed(0))
    assert_close(l2, loss.detach())


def test_vat_loss_value():
    torch.manual_seed(1)
    W = torch.randn(3, 4, dtype=F64)
    model = lambda x: x @ W.T  # noqa: E731
    x = torch.randn(5, 4, dtype=F64)
    loss = fastml.vat_loss(model, x, eps=0.3, generator=torch.Generator().manual_seed(2))
    d = _vat_direction(model, x, model(x), 1e-6, 1, torch.Generator().manual_seed(2))
    assert_close(loss, F.kl_div(F.log_softmax(model(x + 0.3 * d), -1), F.log_softmax(model(x), -1),
                                log_target=True, reduction="batchmean"))


def test_vat_bad_inputs():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="eps"):
        fastml.vat_loss(model, x, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        fastml.vat_loss(model, x, eps=-1.0)
    with pytest.raises(ValueError, match="xi"):
        fastml.vat_loss(model, x, xi=0.0)
    with pytest.raises(TypeError, match="x"):
        fastml.vat_loss(model, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        fastml.vat_loss(model, x, logits=torch.randn(3, 3))


# ---- noise consistency ----


def test_noise_consistency_is_the_jacobian_penalty_in_expectation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(3, 6, dtype=F64)
    sigma, n = 0.1, 4000
    got = fastml.noise_consistency(lin, x, sigma=sigma, n_samples=n, generator=torch.Generator().manual_seed(0))
    expected = sigma**2 * lin.weight.detach().pow(2).sum()  # E ||W e||^2 for a linear map
    # each draw is a weighted chi-square; its standard error over n draws bounds the check
    assert abs(got.item() - expected.item()) < 5 * math.sqrt(2.0) * expected.item() / math.sqrt(n)
    got.backward()
    assert lin.weight.grad is not None and lin.bias.grad.abs().max() < 1e-12  # the bias cancels
    with pytest.raises(ValueError, match="sigma"):
        fastml.noise_consistency(lin, x, sigma=-0.1)
    with pytest.raises(ValueError, match="n_samples"):
        fastml.noise_consistency(lin, x, sigma=0.1, n_samples=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_auto_matches_reference(dtype):
    """What auto runs on CUDA (triton) against the reference, values and gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    p, q = ((torch.randn(64, 5000, device="cuda", generator=g) * 3).to(dtype).requires_grad_() for _ in range(2))
    got = fastml.softmax_kl(p, q)
    ref = fastml.softmax_kl(p, q, backend="reference")
    assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for x, y in zip(torch.autograd.grad(got, (p, q)), torch.autograd.grad(ref, (p, q))):
        assert_close(x, y, dtype=dtype)

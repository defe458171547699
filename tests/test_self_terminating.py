"""The self-terminating output layer: every backend this machine runs against the float64 reference (log-probs,
log_alpha, the NLL and its gradients under every reduction and padding mask), the model's guarantees (p_t(eos) >=
1 - (1 - eps)^t, normalized steps, every sampled sequence ending by the bound's horizon), chaining with
log_alpha_prev, gradcheck, opcheck, torch.compile, bad inputs and the GPU path."""
import math

import pytest
import torch

import fastml
from fastml.ops.self_terminating import reference
from fastml.testing import assert_close
from support import BF16, F16, F32, F64, targets

OPS = ("self_terminating_fwd", "self_terminating_nll_fwd", "self_terminating_nll_bwd")


def _dtypes(target):
    if target.backend == "triton" and target.device == "cpu":
        return (F32, F64, F16)   # no bfloat16 in the interpreter
    return (F32, F64, F16, BF16)


def _shape(target):
    return (2, 5, 37) if target.kind == "interp" else (3, 9, 301)


def _inputs(B, T, V, dtype, device="cpu", *, seed=0, eos=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g, dtype=F64) * scale
    x[..., eos] += 1.0   # eos logits of both signs
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, 1] = eos        # some eos targets (mid-sequence: their gradient runs through the later steps too)
    y[0, -1] = eos
    return x.to(device, dtype), y.to(device)


def _ref_ls(x, eos, eps, prev=None):
    lp, la = reference.self_terminating_log_softmax(x.detach().cpu().double(), eos, eps,
                                                    None if prev is None else prev.detach().cpu().double())
    return lp, la


def _mask(B, T, device):
    lengths = torch.tensor([T, T - 2, 1, 0, T - 1][:B] + [T] * max(0, B - 5))
    return (torch.arange(T) < lengths[:, None]).to(device)


# ---- forward against the reference ----


@pytest.mark.parametrize("one_step", [False, True])
def test_log_softmax_matches_reference(target, one_step):
    B, T, V = _shape(target)
    for dtype in _dtypes(target):
        x, _ = _inputs(B, T, V, dtype, target.device)
        prev = -torch.rand(B, dtype=F64).to(target.device) * 3
        xin = x[:, 0] if one_step else x
        lp, la = fastml.self_terminating_log_softmax(xin, 3, eps=0.05, log_alpha_prev=prev, backend=target.backend)
        want_lp, want_la = _ref_ls(xin, 3, 0.05, prev)
        assert lp.dtype == dtype and la.dtype == (F64 if dtype == F64 else F32)
        assert lp.shape == xin.shape and la.shape == xin.shape[:-1]
        assert_close(la, want_la, dtype=dtype, name=f"{target.backend} log_alpha {dtype}")
        assert_close(lp, want_lp, dtype=dtype, name=f"{target.backend} logp {dtype}")


def test_steps_normalized_and_bounded(target):
    """Each step's probabilities sum to 1, and p_t(eos) >= 1 - (1 - eps)^t, tight when the eos logit is large."""
    B, T, V, eos, eps = 4, 12, 40, 7, 0.1
    x, _ = _inputs(B, T, V, F64, target.device, eos=eos)
    x[0, :, eos] = 60.0    # sigmoid = 1: p_t(eos) = 1 - (1 - eps)^t exactly
    x[1, :, eos] = -60.0   # eos certain at once
    lp, la = fastml.self_terminating_log_softmax(x, eos, eps=eps, backend=target.backend)
    p = lp.exp()
    assert_close(p.sum(-1), torch.ones(B, T, dtype=F64, device=target.device))
    t = torch.arange(1, T + 1, dtype=F64, device=target.device)
    bound = 1 - (1 - eps) ** t
    assert bool((p[..., eos] >= bound - 1e-12).all())
    assert_close(p[0, :, eos], bound)
    assert_close(p[1, :, eos], torch.ones(T, dtype=F64, device=target.device))
    assert bool((la <= 0).all())


def test_sampled_sequences_end_by_horizon(target):
    """A toy model that strongly prefers never to stop (eos logit +8 means 'continue', other tokens random):
    sampling step by step with log_alpha_prev, every sequence ends by the horizon T* where the chance of running
    on, prod_t alpha_t <= (1 - eps)^(T*(T*+1)/2), is below 1e-12; greedy ends by log(1/2) / log(1 - eps)."""
    eps, V, eos, N = 0.05, 20, 0, 256
    horizon = next(T for T in range(1, 1000) if T * (T + 1) / 2 * math.log1p(-eps) < math.log(1e-12))
    greedy_horizon = math.ceil(math.log(0.5) / math.log1p(-eps))
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(V, V, generator=gen, dtype=F64)
    for greedy, bound in ((False, horizon), (True, greedy_horizon)):
        tok = torch.randint(1, V, (N,), generator=gen)
        la = None
        ended = torch.zeros(N, dtype=torch.bool)
        for step in range(1, bound + 1):
            z = proj[tok].clone()
            z[:, eos] = 8.0
            z = z.to(target.device)
            lp, la = fastml.self_terminating_log_softmax(z, eos, eps=eps, log_alpha_prev=la, backend=target.backend)
            if greedy:
                tok = lp.argmax(-1).cpu()
            else:
                tok = torch.multinomial(lp.exp().cpu(), 1, generator=gen).squeeze(1)
            ended |= tok == eos
            tok = torch.where(tok == eos, torch.ones_like(tok), tok)
        assert bool(ended.all()), f"greedy={greedy}: {int((~ended).sum())} sequences still running at step {bound}"


def test_chaining_equals_whole_sequence(target):
    B, T, V = _shape(target)
    x, _ = _inputs(B, T, V, F64, target.device)
    lp, la = fastml.self_terminating_log_softmax(x, 3, eps=0.02, backend=target.backend)
    prev = None
    for t in range(T):
        lpt, prev = fastml.self_terminating_log_softmax(x[:, t], 3, eps=0.02, log_alpha_prev=prev,
                                                        backend=target.backend)
        assert_close(lpt, lp[:, t])
        assert_close(prev, la[:, t])
    # and in two halves
    h = T // 2
    _, la1 = fastml.self_terminating_log_softmax(x[:, :h], 3, eps=0.02, backend=target.backend)
    lp2, la2 = fastml.self_terminating_log_softmax(x[:, h:], 3, eps=0.02, log_alpha_prev=la1[:, -1],
                                                   backend=target.backend)
    assert_close(lp2, lp[:, h:])
    assert_close(la2, la[:, h:])


# ---- NLL: values and gradients ----


def _nll_run(backend, x, y, grad_out=None, **kw):
    xx = x.detach().clone().requires_grad_(True)
    loss = fastml.self_terminating_nll(xx, y, 3, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), xx.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_nll_matches_reference(target, reduction, masked):
    B, T, V = _shape(target)
    B = max(B, 4) if masked else B
    for dtype in _dtypes(target):
        x, y = _inputs(B, T, V, dtype, target.device, seed=1)
        mask = _mask(B, T, target.device) if masked else None
        if masked:
            y = torch.where(mask, y, torch.full_like(y, -100))   # padding targets are never read
        g = torch.Generator().manual_seed(5)
        go = torch.randn((B, T) if reduction == "none" else (), generator=g, dtype=F64).to(target.device)
        if dtype in (F16, BF16):
            go = go.to(dtype)
        loss, grad = _nll_run(target.backend, x, y, go, eps=0.05, mask=mask, reduction=reduction)
        want_loss, want_grad = _nll_run("reference", x.double(), y, go.double(), eps=0.05, mask=mask,
                                        reduction=reduction)
        assert loss.dtype == dtype and grad.dtype == dtype and loss.shape == want_loss.shape
        name = f"{target.backend} {dtype} {reduction} masked={masked}"
        assert_close(loss, want_loss, dtype=dtype, name=name + " loss")
        assert_close(grad, want_grad, dtype=dtype, name=name + " grad")
        if masked and reduction == "none":
            assert bool((loss[~mask] == 0).all())
        if masked:
            assert bool((grad[~mask] == 0).all())


def test_long_rows_eos_in_a_later_block(target):
    """Rows longer than the kernels' blocks (512 in C++), eos inside a later block, a partial last block."""
    B, T, V, eos = (2, 2, 1300, 700) if target.kind == "interp" else (3, 4, 2100, 1030)
    for dtype in (F32, F64):
        g = torch.Generator().manual_seed(11)
        x = (torch.randn(B, T, V, generator=g, dtype=F64) * 3).to(target.device, dtype)
        x[0, :, eos] = 9.0   # eos the largest logit of its block: it must not enter the log-sum-exp
        y = torch.randint(0, V, (B, T), generator=g).to(target.device)
        y[:, 0] = eos
        xx = x.clone().requires_grad_(True)
        loss = fastml.self_terminating_nll(xx, y, eos, eps=0.01, reduction="sum", backend=target.backend)
        loss.backward()
        xr = x.double().requires_grad_(True)
        want = fastml.self_terminating_nll(xr, y, eos, eps=0.01, reduction="sum", backend="reference")
        want.backward()
        assert_close(loss, want.to(dtype), dtype=dtype)
        assert_close(xx.grad, xr.grad.to(dtype), dtype=dtype)
        lp, la = fastml.self_terminating_log_softmax(x, eos, eps=0.01, backend=target.backend)
        want_lp, want_la = _ref_ls(x, eos, 0.01)
        assert_close(lp, want_lp.to(target.device, dtype), dtype=dtype)
        assert_close(la, want_la.to(target.device, la.dtype), dtype=dtype)


def test_nll_equals_gathered_log_softmax(target):
    B, T, V = _shape(target)
    x, y = _inputs(B, T, V, F64, target.device, seed=2)
    lp, _ = fastml.self_terminating_log_softmax(x, 3, eps=0.1, backend=target.backend)
    want = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert_close(fastml.self_terminating_nll(x, y, 3, eps=0.1, reduction="none", backend=target.backend), want)
    assert_close(fastml.self_terminating_nll(x, y, 3, eps=0.1, backend=target.backend), want.mean())


def test_log_softmax_gradients(target):
    """Gradients of (log p, log_alpha) into logits and log_alpha_prev against autograd of the float64 reference."""
    B, T, V = _shape(target)
    for dtype in (F32, F64):
        x, _ = _inputs(B, T, V, dtype, target.device, seed=3)
        prev = (-torch.rand(B, dtype=F64) * 2).to(target.device)
        g = torch.Generator().manual_seed(9)
        glp = torch.randn(B, T, V, generator=g, dtype=F64).to(target.device)
        gla = torch.randn(B, T, generator=g, dtype=F64).to(target.device)
        out = []
        for be, xd, gd in ((target.backend, dtype, dtype), ("reference", F64, F64)):
            xx = x.detach().to(xd).clone().requires_grad_(True)
            pp = prev.detach().to(F64 if xd == F64 else F32).clone().requires_grad_(True)
            lp, la = fastml.self_terminating_log_softmax(xx, 3, eps=0.05, log_alpha_prev=pp, backend=be)
            torch.autograd.backward([lp, la], [glp.to(lp.dtype), gla.to(la.dtype)])
            out.append((xx.grad, pp.grad))
        assert_close(out[0][0], out[1][0], dtype=dtype, name=f"{target.backend} d logits")
        assert_close(out[0][1], out[1][1], dtype=dtype, name=f"{target.backend} d log_alpha_prev")


def test_gradcheck(target):
    """gradcheck-level agreement in float64 (finite differences of the backend itself)."""
    B, T, V = 2, 3, 5
    x, y = _inputs(B, T, V, F64, target.device, seed=4, eos=1)
    mask = torch.tensor([[True, True, True], [True, True, False]], device=target.device)
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda t: fastml.self_terminating_nll(t, y, 1, eps=0.2, mask=mask, reduction=red,
                                                  backend=target.backend),
            (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    prev = torch.tensor([-0.3, -1.2], dtype=F64, device=target.device)
    assert torch.autograd.gradcheck(
        lambda t, p: fastml.self_terminating_log_softmax(t, 1, eps=0.2, log_alpha_prev=p, backend=target.backend),
        (x.clone().requires_grad_(True), prev.clone().requires_grad_(True)), eps=1e-6, atol=1e-7)


def test_double_backward(target):
    x, y = _inputs(2, 3, 6, F64, target.device)
    xx = x.clone().requires_grad_(True)
    loss = fastml.self_terminating_nll(xx, y, 3, reduction="sum", backend=target.backend)
    if target.backend == "reference":
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        g.sum().backward()
        return
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xx, create_graph=True)
    lp, _ = fastml.self_terminating_log_softmax(xx, 3, backend=target.backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), xx, create_graph=True)


def test_retained_graph_second_backward(target):
    x, y = _inputs(2, 4, 9, F64, target.device)
    xx = x.clone().requires_grad_(True)
    loss = fastml.self_terminating_nll(xx, y, 3, backend=target.backend)
    loss.backward(retain_graph=True)
    first = xx.grad.clone()
    xx.grad = None
    loss.backward(torch.tensor(2.0, dtype=F64, device=target.device))
    assert_close(xx.grad, 2 * first)


def test_inputs_not_modified(target):
    x, y = _inputs(2, 4, 9, F32, target.device)
    mask = _mask(2, 4, target.device)
    prev = torch.tensor([-0.5, -0.1], device=target.device)
    copies = [t.clone() for t in (x, y, mask, prev)]
    xx = x.clone().requires_grad_(True)
    fastml.self_terminating_nll(xx, y, 3, mask=mask, backend=target.backend).backward()
    lp, _ = fastml.self_terminating_log_softmax(xx, 3, log_alpha_prev=prev, backend=target.backend)
    lp.sum().backward()
    for a, b in zip((xx.detach(), y, mask, prev), copies):
        assert torch.equal(a, b)


def test_non_contiguous(target):
    x, y = _inputs(4, 3, 11, F64, target.device)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)   # same values, non-contiguous
    assert not xt.is_contiguous()
    assert_close(fastml.self_terminating_nll(xt, y, 3, backend=target.backend),
                 fastml.self_terminating_nll(x, y, 3, backend="reference"))
    assert_close(fastml.self_terminating_log_softmax(xt, 3, backend=target.backend)[0],
                 fastml.self_terminating_log_softmax(x, 3, backend="reference")[0])


# ---- bad input ----


def test_bad_inputs():
    x, y = _inputs(2, 3, 6, F32)
    nll, ls = fastml.self_terminating_nll, fastml.self_terminating_log_softmax
    with pytest.raises(IndexError, match="eos_id"):
        ls(x, 6)
    with pytest.raises(IndexError, match="eos_id"):
        nll(x, y, -1)
    with pytest.raises(TypeError, match="eos_id"):
        ls(x, 1.0)
    with pytest.raises(TypeError, match="logits"):
        ls(x.long(), 1)
    with pytest.raises(ValueError, match="logits"):
        ls(x[0, 0], 1)
    with pytest.raises(ValueError, match="logits"):
        nll(x[:, 0], y, 1)
    with pytest.raises(ValueError, match="logits"):
        ls(x[..., :1], 0)
    with pytest.raises(ValueError, match="eps"):
        ls(x, 1, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        nll(x, y, 1, eps=1.0)
    with pytest.raises(TypeError, match="eps"):
        ls(x, 1, eps="a")
    with pytest.raises(ValueError, match="log_alpha_prev"):
        ls(x, 1, log_alpha_prev=torch.zeros(3))
    with pytest.raises(ValueError, match="log_alpha_prev"):
        ls(x, 1, log_alpha_prev=torch.tensor([0.1, -1.0]))
    with pytest.raises(TypeError, match="log_alpha_prev"):
        ls(x, 1, log_alpha_prev=torch.zeros(2, dtype=torch.long))
    bad = y.clone()
    bad[1, 2] = 6
    with pytest.raises(IndexError, match=r"target\[1, 2\]"):
        nll(x, bad, 1)
    bad[1, 2] = -100
    with pytest.raises(IndexError, match="target"):
        nll(x, bad, 1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    nll(x, bad, 1, mask=mask)   # a padding target is not read
    with pytest.raises(TypeError, match="target"):
        nll(x, y.float(), 1)
    with pytest.raises(ValueError, match="target"):
        nll(x, y[:, :2], 1)
    with pytest.raises(ValueError, match="right-padded"):
        nll(x, y, 1, mask=torch.tensor([[True, False, True], [True, True, True]]))
    with pytest.raises(TypeError, match="mask"):
        nll(x, y, 1, mask=mask.long())
    with pytest.raises(ValueError, match="mask"):
        nll(x, y, 1, mask=mask[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        nll(x, y, 1, reduction="batchmean")


@pytest.mark.parametrize("target", targets(kernels=True))
def test_kernel_op_checks(target):
    suffix = "_triton" if target.backend == "triton" else ""
    fwd, nll_fwd, _ = (getattr(torch.ops.fastml, n + suffix) for n in OPS)
    x, y = _inputs(2, 3, 6, F32, target.device)
    lengths = torch.tensor([3, 2], device=target.device)
    with pytest.raises((IndexError, RuntimeError), match="eos_id"):
        fwd(x, 6, 0.1, None)
    bad = y.clone()
    bad[0, 1] = 99
    with pytest.raises((IndexError, RuntimeError), match="out of range|target"):
        nll_fwd(x, bad, lengths, 1, 0.1, 1, False)
    with pytest.raises((ValueError, RuntimeError), match="lengths"):
        nll_fwd(x, y, torch.tensor([4, 1], device=target.device), 1, 0.1, 1, False)


# ---- opcheck and torch.compile ----


@pytest.mark.parametrize("target", targets(kernels=True))
def test_opcheck(target):
    suffix = "_triton" if target.backend == "triton" else ""
    fwd, nll_fwd, nll_bwd = (getattr(torch.ops.fastml, n + suffix) for n in OPS)
    x, y = _inputs(2, 4, 7, F32, target.device)
    lengths = torch.tensor([4, 2], device=target.device)
    torch.library.opcheck(fwd.default, (x, 3, 0.1, None))
    torch.library.opcheck(fwd.default, (x, 3, 0.1, torch.tensor([-0.2, -1.0], device=target.device)))
    for red, grad in ((0, False), (1, True), (2, True)):
        torch.library.opcheck(nll_fwd.default, (x, y, lengths, 3, 0.1, red, grad))
    _, lse, la, _ = nll_fwd(x, y, lengths, 3, 0.1, 0, False)
    torch.library.opcheck(nll_bwd.default, (torch.randn(2, 4, device=target.device), x, y, lengths, lse, la, 3))


@pytest.mark.parametrize("target", targets(kernels=True))
def test_compile(target):
    backend = "inductor" if target.backend == "cpp" else "aot_eager"
    x, y = _inputs(2, 5, 13, F32, target.device)
    mask = _mask(2, 5, target.device)

    def f(t):
        loss = fastml.self_terminating_nll(t, y, 3, eps=0.05, mask=mask, backend=target.backend)
        lp, la = fastml.self_terminating_log_softmax(t, 3, eps=0.05, backend=target.backend)
        return 2.0 * loss + lp[..., 3].sum() + la.sum()

    def ref(t):
        loss = fastml.self_terminating_nll(t, y, 3, eps=0.05, mask=mask, backend="reference")
        lp, la = fastml.self_terminating_log_softmax(t, 3, eps=0.05, backend="reference")
        return 2.0 * loss + lp[..., 3].sum() + la.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    a = x.clone().requires_grad_(True)
    out = compiled(a)
    out.backward()
    b = x.double().requires_grad_(True)
    want = ref(b)
    want.backward()
    assert_close(out, want.float())
    assert_close(a.grad, b.grad.float())


# ---- GPU ----


@pytest.mark.gpu
class TestCuda:
    """What auto runs on CUDA (triton) against the float64 reference at a realistic vocabulary."""

    @pytest.mark.parametrize("dtype", [F32, BF16])
    def test_nll_auto(self, dtype):
        x, y = _inputs(4, 64, 32000, dtype, "cuda", seed=6)
        mask = _mask(4, 64, "cuda")
        loss, grad = _nll_run("auto", x, y, mask=mask)
        want_loss, want_grad = _nll_run("reference", x.double(), y, mask=mask)
        assert_close(loss, want_loss, dtype=dtype)
        assert_close(grad, want_grad, dtype=dtype)

    def test_log_softmax_auto(self):
        x, _ = _inputs(4, 64, 32000, F32, "cuda", seed=7)
        lp, la = fastml.self_terminating_log_softmax(x, 3)
        want_lp, want_la = _ref_ls(x, 3, 1e-3)
        assert_close(lp, want_lp.cuda().float())
        assert_close(la, want_la.cuda().float())

"""Logit-adjusted cross-entropy: every backend this machine runs against F.cross_entropy(logits + tau * log_prior)
in float64 (values and gradients, every reduction with a random output gradient, class weights, label smoothing,
ignore_index, masked classes), the chunked linear head against its unfused form, the modules, opcheck,
torch.compile, bad inputs and the example."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastml
from fastml.testing import assert_close
from support import BF16, F16, F32, F64, targets

OPS = ("logit_adjusted_ce_fwd", "logit_adjusted_ce_bwd")


def _dtypes(target):
    # bfloat16 is not run through the Triton interpreter (numpy has no bfloat16).
    if target.backend == "triton" and target.device == "cpu":
        return (F32, F64, F16)
    return (F32, F64, F16, BF16)


def _rows(target, C):
    """Rows per case: the Triton interpreter runs one program at a time, so it gets few rows of a wide row."""
    if target.kind == "interp":
        return 3 if C > 5000 else 9
    return 5 if C > 5000 else 37


def _inputs(N, C, dtype, *, seed=0, ignore=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, C, generator=g, dtype=F64) * 2).to(device, dtype)
    target = torch.randint(0, C, (N,), generator=g)
    if ignore and N > 3:
        target[1::4] = -100
    counts = torch.randint(1, 200, (C,), generator=g)
    weight = torch.rand(C, generator=g, dtype=F64) + 0.5
    return logits, target.to(device), counts.to(device), weight.to(device)


def _expected(logits, target, *, log_prior=None, class_counts=None, tau=1.0, weight=None, grad_out=None, **kw):
    """F.cross_entropy on the adjusted logits in float64: (loss, d loss / d logits with grad_out)."""
    x = logits.detach().cpu().double().requires_grad_(True)
    if class_counts is not None:
        c = class_counts.cpu().double()
        log_prior = (c / c.sum()).log()
    z = x if log_prior is None else x + tau * log_prior.cpu().double()
    loss = F.cross_entropy(z, target.cpu().long(), weight=None if weight is None else weight.cpu().double(), **kw)
    go = torch.ones((), dtype=F64) if grad_out is None else grad_out.cpu().double()
    loss.backward(go)
    return loss.detach(), x.grad


def _run(backend, logits, target, grad_out=None, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fastml.logit_adjusted_cross_entropy(x, target, backend=backend, **kw)
    go = torch.ones(loss.shape, dtype=loss.dtype, device=loss.device) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), x.grad


def _check(backend, logits, target, *, equal_nan=False, **kw):
    reduction = kw.get("reduction", "mean")
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(logits.shape[0] if reduction == "none" else (), generator=g, dtype=F64)
    grad_out = grad_out.to(logits.device)
    loss, grad = _run(backend, logits, target, grad_out=grad_out, **kw)
    if logits.dtype in (F16, BF16):
        # the half-typed output gradient that the backend actually received
        grad_out = grad_out.to(logits.dtype)
    want_loss, want_grad = _expected(logits, target, grad_out=grad_out, **kw)
    assert loss.dtype == logits.dtype and grad.dtype == logits.dtype
    assert loss.shape == want_loss.shape
    assert_close(loss, want_loss, dtype=logits.dtype, equal_nan=equal_nan, name=f"{backend} loss")
    assert_close(grad, want_grad, dtype=logits.dtype, equal_nan=equal_nan, name=f"{backend} grad")


# ---- values and gradients ----


@pytest.mark.parametrize("C", [1, 2, 7, 1000, 33000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_definition(target, C, reduction):
    N = _rows(target, C)
    logits, tgt, counts, weight = _inputs(N, C, F32, device=target.device)
    _check(target.backend, logits, tgt, class_counts=counts, tau=1.0, reduction=reduction)
    _check(target.backend, logits, tgt, class_counts=counts, tau=0.5, weight=weight, label_smoothing=0.1,
           reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("C", [3, 100])
def test_options(target, reduction, smoothing, weighted, C):
    logits, tgt, counts, weight = _inputs(_rows(target, C), C, F32, seed=C, device=target.device)
    log_prior = torch.randn(C, dtype=F64).to(target.device)
    _check(target.backend, logits, tgt, log_prior=log_prior, tau=1.5, weight=weight if weighted else None,
           label_smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("C", [5, 700])
def test_dtypes(target, C):
    for dtype in _dtypes(target):
        logits, tgt, counts, weight = _inputs(_rows(target, C), C, dtype, seed=3, device=target.device)
        for reduction in ("mean", "none"):
            _check(target.backend, logits, tgt, class_counts=counts, weight=weight, label_smoothing=0.1,
                   reduction=reduction)


def test_no_prior_is_plain_cross_entropy(target):
    logits, tgt, counts, _ = _inputs(11, 6, F64, device=target.device)
    plain = F.cross_entropy(logits, tgt)
    for kw in ({}, {"class_counts": counts, "tau": 0.0}):
        got = fastml.logit_adjusted_cross_entropy(logits, tgt, backend=target.backend, **kw)
        assert_close(got, plain, name=str(kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_rows_ignored(target, reduction, smoothing):
    logits, _, counts, weight = _inputs(6, 9, F32, device=target.device)
    tgt = torch.full((6,), -100, device=target.device)
    # PyTorch: mean over no rows is 0 / 0 = NaN, sum 0, none zeros; the gradient is zero.
    _check(target.backend, logits, tgt, class_counts=counts, weight=weight, label_smoothing=smoothing,
           reduction=reduction, equal_nan=True)
    loss, grad = _run(target.backend, logits, tgt, class_counts=counts, reduction=reduction)
    if reduction == "mean":
        assert math.isnan(float(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_inside_class_range(target):
    logits, tgt, counts, weight = _inputs(12, 5, F32, ignore=False, device=target.device)
    _check(target.backend, logits, tgt, class_counts=counts, weight=weight, ignore_index=2, label_smoothing=0.1)
    _, grad = _run(target.backend, logits, tgt, class_counts=counts, ignore_index=2)
    assert torch.equal(grad[tgt == 2], torch.zeros_like(grad[tgt == 2]))


@pytest.mark.parametrize("C", [6, 2000])
def test_masked_classes(target, C):
    """-inf logits (classes masked out) where the targets' logits are finite: finite loss, zero gradient there."""
    N = _rows(target, C)
    logits, tgt, counts, weight = _inputs(N, C, F32, ignore=False, device=target.device)
    mask = torch.rand(N, C, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, 0] = True
    mask = mask.to(target.device)
    mask[torch.arange(N), tgt] = False
    logits = logits.masked_fill(mask, float("-inf"))
    for reduction in ("mean", "none"):
        _check(target.backend, logits, tgt, class_counts=counts, weight=weight, reduction=reduction)
        loss, grad = _run(target.backend, logits, tgt, class_counts=counts, reduction=reduction)
        assert torch.isfinite(loss).all()
        assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))
    # With smoothing every class gets mass, so a masked class makes the loss infinite (as PyTorch).
    loss, grad = _run(target.backend, logits, tgt, label_smoothing=0.1, reduction="none")
    assert torch.isinf(loss).all() and torch.isfinite(grad).all()


def test_non_contiguous_logits_and_int32_target(target):
    logits, tgt, counts, weight = _inputs(8, 13, F32, device=target.device)
    wide = logits.t().contiguous().t()  # same values, column-major
    assert not wide.is_contiguous()
    _check(target.backend, wide, tgt.int(), class_counts=counts, weight=weight, label_smoothing=0.05)


def test_retained_graph_second_backward(target):
    """The fused forward's gradient buffer is scaled in place by the first backward; a second backward through a
    retained graph recomputes it, so the two accumulate to twice the gradient."""
    logits, tgt, counts, _ = _inputs(10, 17, F32, device=target.device)
    for reduction, go in (("mean", 0.5), ("sum", 1.0), ("none", None)):
        x = logits.clone().requires_grad_(True)
        loss = fastml.logit_adjusted_cross_entropy(x, tgt, class_counts=counts, reduction=reduction,
                                                   backend=target.backend)
        g = torch.full(loss.shape, 0.5 if go is None else go, device=loss.device)
        loss.backward(g, retain_graph=True)
        loss.backward(g)
        _, want = _expected(logits, tgt, class_counts=counts, reduction=reduction, grad_out=g)
        assert_close(x.grad, 2 * want, name=f"{reduction} twice")


def test_never_writes_into_inputs(target):
    logits, tgt, counts, weight = _inputs(7, 12, F32, device=target.device)
    lp = torch.randn(12, dtype=F64, device=target.device)
    copies = [t.clone() for t in (logits, tgt, lp, weight)]
    x = logits.clone().requires_grad_(True)
    before = x.detach().clone()
    fastml.logit_adjusted_cross_entropy(x, tgt, log_prior=lp, weight=weight, label_smoothing=0.1,
                                        backend=target.backend).backward()
    assert torch.equal(x.detach(), before)
    for a, b in zip((logits, tgt, lp, weight), copies):
        assert torch.equal(a, b)


def test_no_grad_forward(target):
    logits, tgt, counts, _ = _inputs(9, 40, F32, device=target.device)
    with torch.no_grad():
        got = fastml.logit_adjusted_cross_entropy(logits.requires_grad_(True), tgt, class_counts=counts,
                                                  backend=target.backend)
    want, _ = _expected(logits, tgt, class_counts=counts)
    assert_close(got, want)


def test_empty_batch(target):
    logits = torch.randn(0, 4, device=target.device, requires_grad=True)
    tgt = torch.zeros(0, dtype=torch.long, device=target.device)
    assert math.isnan(float(fastml.logit_adjusted_cross_entropy(logits, tgt, backend=target.backend)))
    loss = fastml.logit_adjusted_cross_entropy(logits, tgt, reduction="sum", backend=target.backend)
    loss.backward()
    assert float(loss) == 0.0 and logits.grad.shape == (0, 4)


# ---- adjust_logits ----


def test_adjust_logits():
    logits, _, counts, _ = _inputs(5, 8, F32)
    lp = (counts.double() / counts.sum()).log()
    got = fastml.adjust_logits(logits, class_counts=counts, tau=0.7)
    assert got.dtype == F32
    assert_close(got, logits.double() - 0.7 * lp)
    same = fastml.adjust_logits(logits, log_prior=lp + 3.0, tau=0.7)  # a constant shifts every class alike
    assert_close(same.softmax(-1), got.softmax(-1))
    plain = fastml.adjust_logits(logits)
    assert torch.equal(plain, logits) and plain is not logits
    half = fastml.adjust_logits(logits.half(), class_counts=counts)
    assert half.dtype == F16


# ---- the linear head ----


def _linear_inputs(N, D, C, dtype=F32, *, seed=0, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=F64).to(device, dtype)
    weight = (torch.randn(C, D, generator=g, dtype=F64) / math.sqrt(D)).to(device, dtype)
    b = (torch.randn(C, generator=g, dtype=F64) * 0.1).to(device, dtype) if bias else None
    tgt = torch.randint(0, C, (N,), generator=g)
    tgt[2::5] = -100
    counts = torch.randint(1, 100, (C,), generator=g)
    cw = torch.rand(C, generator=g, dtype=F64) + 0.5
    return hidden, weight, b, tgt.to(device), counts.to(device), cw.to(device)


def _linear_run(backend, hidden, weight, bias, tgt, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = fastml.linear_logit_adjusted_cross_entropy(leaves[0], leaves[1], tgt, leaves[2], backend=backend, **kw)
    loss.backward(grad_out.to(loss.dtype))
    return [loss.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_head_matches_unfused(target, reduction, bias):
    hidden, weight, b, tgt, counts, cw = _linear_inputs(23, 16, 37, bias=bias, device=target.device)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(23 if reduction == "none" else (), generator=g, dtype=F64).to(target.device)
    kw = dict(class_counts=counts, tau=0.8, class_weight=cw, label_smoothing=0.1, reduction=reduction)
    want = _linear_run("reference", *(None if t is None else t.double() for t in (hidden, weight, b)), tgt,
                       grad_out, **kw)
    for chunk in (None, 5, 23, 64):
        got = _linear_run(target.backend, hidden, weight, b, tgt, grad_out, chunk_size=chunk, **kw)
        for name, a, e in zip(("loss", "hidden", "weight", "bias"), got, want):
            if e is None:
                assert a is None
                continue
            assert a.dtype == hidden.dtype
            assert_close(a, e, name=f"{target.backend} chunk {chunk} {reduction} {name}")


def test_linear_head_reduction_none_per_row_gradients(target):
    """reduction="none" with an output gradient that differs per row (zero on some rows): each row's share of the
    weight gradient must be scaled by its own output gradient."""
    hidden, weight, b, tgt, counts, cw = _linear_inputs(12, 8, 10, device=target.device)
    grad_out = torch.zeros(12, dtype=F64, device=target.device)
    grad_out[3] = 2.0
    got = _linear_run(target.backend, hidden, weight, b, tgt, grad_out, class_counts=counts, reduction="none",
                      chunk_size=4)
    logits = (hidden.double() @ weight.double().t() + b.double()).detach().requires_grad_(True)
    lp = (counts.double() / counts.sum()).log()
    F.cross_entropy(logits + lp, tgt, reduction="none").backward(grad_out)
    assert_close(got[2], logits.grad.t() @ hidden.double(), name="grad_weight")
    assert torch.equal(got[1][torch.arange(12) != 3], torch.zeros(11, 8, device=target.device))


def test_linear_head_dtypes(target):
    for dtype in _dtypes(target):
        hidden, weight, b, tgt, counts, cw = _linear_inputs(10, 8, 12, dtype, device=target.device)
        grad_out = torch.tensor(1.0, device=target.device)
        want = _linear_run("reference", hidden.double(), weight.double(), b.double(), tgt, grad_out,
                           class_counts=counts)
        got = _linear_run(target.backend, hidden, weight, b, tgt, grad_out, class_counts=counts, chunk_size=4)
        for name, a, e in zip(("loss", "hidden", "weight", "bias"), got, want):
            assert a.dtype == dtype
            assert_close(a, e, dtype=dtype, name=f"{dtype} {name}")


def test_linear_head_retained_graph(target):
    hidden, weight, b, tgt, counts, cw = _linear_inputs(9, 6, 11, device=target.device)
    h = hidden.clone().requires_grad_(True)
    loss = fastml.linear_logit_adjusted_cross_entropy(h, weight, tgt, b, class_counts=counts, chunk_size=4,
                                                      backend=target.backend)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    assert_close(h.grad, 2 * first)


def test_default_chunk_size():
    from fastml.ops.cross_entropy import _default_chunk_size

    assert _default_chunk_size(8192, 32000, 1024) == 256
    assert _default_chunk_size(10, 50000, 4) == 16
    assert _default_chunk_size(4096, 10, 64) >= 4096


# ---- modules ----


def test_modules(target):
    logits, tgt, counts, weight = _inputs(9, 7, F32, device=target.device)
    loss_fn = fastml.nn.LogitAdjustedCrossEntropyLoss(class_counts=counts, tau=0.5, weight=weight,
                                                      label_smoothing=0.1, reduction="sum")
    want, _ = _expected(logits, tgt, class_counts=counts, tau=0.5, weight=weight, label_smoothing=0.1,
                        reduction="sum")
    assert_close(loss_fn(logits, tgt), want)
    assert loss_fn.log_prior.dtype == F64 and "tau=0.5" in repr(loss_fn)
    hidden, w, b, tgt2, counts2, cw = _linear_inputs(9, 4, 7, device=target.device)
    head = fastml.nn.LinearLogitAdjustedCrossEntropyLoss(class_counts=counts2, class_weight=cw, chunk_size=4)
    want2 = F.cross_entropy(hidden.double() @ w.double().t() + b.double() +
                            (counts2.double() / counts2.sum()).log(), tgt2, weight=cw.double())
    assert_close(head(hidden, w, tgt2, b), want2)
    plain = fastml.nn.LogitAdjustedCrossEntropyLoss()
    assert_close(plain(logits, tgt), F.cross_entropy(logits, tgt))


def test_module_errors():
    with pytest.raises(ValueError, match="not both"):
        fastml.nn.LogitAdjustedCrossEntropyLoss(log_prior=torch.zeros(3), class_counts=torch.ones(3))
    with pytest.raises(ValueError, match="class_counts"):
        fastml.nn.LogitAdjustedCrossEntropyLoss(class_counts=torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="reduction"):
        fastml.nn.LogitAdjustedCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        fastml.nn.LinearLogitAdjustedCrossEntropyLoss(chunk_size=0)


# ---- bad inputs ----


def _bad_calls():
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    return [
        (dict(logits=x.long()), TypeError, "logits"),
        (dict(logits=torch.randn(4, 3, 2)), ValueError, "logits"),
        (dict(logits=torch.randn(4, 0), target=torch.zeros(4, dtype=torch.long)), ValueError, "logits"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
        (dict(target=t.float()), TypeError, "target"),
        (dict(target=torch.tensor([0, 1, 3, 0])), ValueError, "target"),
        (dict(target=torch.tensor([0, -1, 2, 0])), ValueError, "target"),
        (dict(log_prior=torch.zeros(3), class_counts=torch.ones(3)), ValueError, "not both"),
        (dict(class_counts=torch.tensor([1, 0, 2])), ValueError, "class_counts"),
        (dict(class_counts=torch.tensor([1.0, -2.0, 2.0])), ValueError, "class_counts"),
        (dict(class_counts=torch.ones(4)), ValueError, "class_counts"),
        (dict(log_prior=torch.tensor([0.0, float("-inf"), 1.0])), ValueError, "log_prior"),
        (dict(log_prior=torch.tensor([0.0, float("nan"), 1.0])), ValueError, "log_prior"),
        (dict(log_prior=torch.zeros(3, dtype=torch.long)), TypeError, "log_prior"),
        (dict(log_prior=torch.zeros(3), tau="1"), TypeError, "tau"),
        (dict(log_prior=torch.zeros(3), tau=float("inf")), ValueError, "tau"),
        (dict(weight=torch.ones(2)), ValueError, "weight"),
        (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "weight"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
        (dict(backend="fast"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs(case):
    kw, exc, match = _bad_calls()[case]
    kw = {"logits": torch.randn(4, 3), "target": torch.tensor([0, 1, 2, 0]), **kw}
    with pytest.raises(exc, match=match):
        fastml.logit_adjusted_cross_entropy(kw.pop("logits"), kw.pop("target"), **kw)


def test_linear_bad_inputs():
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 4, 2])
    call = fastml.linear_logit_adjusted_cross_entropy
    with pytest.raises(ValueError, match="weight"):
        call(h, torch.randn(5, 2), t)
    with pytest.raises(TypeError, match="weight"):
        call(h, w.double(), t)
    with pytest.raises(ValueError, match="bias"):
        call(h, w, t, torch.randn(4))
    with pytest.raises(ValueError, match="chunk_size"):
        call(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="target"):
        call(h, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(TypeError, match="hidden"):
        call(h.long(), w, t)
    with pytest.raises(ValueError, match="class_weight"):
        call(h, w, t, class_weight=torch.ones(4))


def test_adjust_logits_bad_inputs():
    with pytest.raises(ValueError, match="not both"):
        fastml.adjust_logits(torch.randn(2, 3), log_prior=torch.zeros(3), class_counts=torch.ones(3))
    with pytest.raises(TypeError, match="logits"):
        fastml.adjust_logits(torch.ones(2, 3, dtype=torch.long), class_counts=torch.ones(3))


def test_kernel_rejects_out_of_range_target():
    """The C++ kernel checks targets itself (the Python check is skipped under torch.compile)."""
    if not fastml.backends()["cpp"][0]:
        pytest.skip("the C++ extension is not built")
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastml.logit_adjusted_ce_fwd(x, torch.tensor([0, 4, 1]), None, None, -100, 1, 0.0, False)


# ---- opcheck and torch.compile ----


def _ops(target):
    suffix = "_triton" if target.backend == "triton" else ""
    return [getattr(torch.ops.fastml, name + suffix) for name in OPS]


@pytest.mark.parametrize("target", targets(kernels=True))
def test_opcheck(target):
    fwd, bwd = _ops(target)
    logits, tgt, counts, weight = _inputs(6, 5, F32, device=target.device)
    bias = torch.randn(5, device=target.device)
    w = weight.float()
    for red, b, ww, grad in ((0, bias, w, True), (1, None, None, True), (2, bias, None, False)):
        torch.library.opcheck(fwd.default, (logits, tgt, b, ww, -100, red, 0.1, grad))
    _, lse, _ = fwd(logits, tgt, bias, w, -100, 0, 0.1, False)
    torch.library.opcheck(bwd.default, (torch.randn(6, device=target.device), logits, tgt, bias, w, lse, -100, 0,
                                        0.1))
    torch.library.opcheck(bwd.default, (torch.tensor(0.5, device=target.device), logits, tgt, None, None, lse, -100,
                                        1, 0.0))


@pytest.mark.parametrize("target", targets(kernels=True))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile(target, reduction):
    # Inductor for cpp, aot_eager for triton (whose launcher the interpreter runs).
    backend = "inductor" if target.backend == "cpp" else "aot_eager"
    logits, tgt, counts, weight = _inputs(8, 6, F32, device=target.device)
    lp = (counts.double() / counts.sum()).log()
    go = torch.randn(8 if reduction == "none" else (), device=target.device)

    def f(x):
        loss = fastml.logit_adjusted_cross_entropy(x, tgt, log_prior=lp, weight=weight, label_smoothing=0.1,
                                                   reduction=reduction, backend=target.backend)
        return loss * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = logits.clone().requires_grad_(True)
    compiled(x).backward(go)
    want_loss, want_grad = _expected(logits, tgt, log_prior=lp, weight=weight, label_smoothing=0.1,
                                     reduction=reduction, grad_out=2 * go)
    x2 = logits.clone().requires_grad_(True)
    assert_close(compiled(x2), 2 * want_loss)
    assert_close(x.grad, want_grad)


# ---- the example ----


def test_long_tail_example(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "examples" / "long_tail.py"), "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    acc = {}
    for line in proc.stdout.splitlines():
        if "balanced accuracy" in line:
            name, value = line.split("balanced accuracy")
            acc[name.strip(" :")] = float(value.strip(" :%"))
    assert set(acc) == {"plain cross-entropy", "post-hoc adjustment", "logit-adjusted loss"}, proc.stdout
    assert acc["post-hoc adjustment"] > acc["plain cross-entropy"] + 3, proc.stdout
    assert acc["logit-adjusted loss"] > acc["plain cross-entropy"] + 3, proc.stdout

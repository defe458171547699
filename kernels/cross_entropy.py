"""Triton kernels of logit-adjusted cross-entropy, the kernels of the torch ops fastml::logit_adjusted_ce_fwd_triton
and fastml::logit_adjusted_ce_bwd_triton (declared in fastml/ops/cross_entropy/schema.py).

Each program owns BR rows and walks their columns in blocks of BC: the bias (tau * log_prior) is added as each
block is loaded, a running row maximum and a running sum of exp(z - max) (rescaled when the maximum grows) give
the log-sum-exp in one read of the logits, and the gradient, when wanted, is written by a second walk over the
same rows. Small C packs many rows into a program (one block covers a row); large C gives each program one row
and loops over it. Computed in float32 (float64 for float64 logits).
"""
import torch
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import device_of

NONE, MEAN = 0, 1
TILE = 4096  # elements of one [BR, BC] block
MAX_BC = 4096


@triton.jit
def _load_z(x, bias, rows64, cols, mr, mc, C, HAS_BIAS: tl.constexpr):
    z = tl.load(x + rows64[:, None] * C + cols[None, :], mask=mr[:, None] & mc[None, :], other=float("-inf"))
    z = z.to(bias.dtype.element_ty)
    if HAS_BIAS:
        z += tl.load(bias + cols, mask=mc, other=0.0)[None, :]
    return z


@triton.jit
def _target_terms(x, tgt, bias, w, consts, rows, mr, N, C, ignore_index, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr):
    """(target ids clamped into [0, C), valid rows, target logits z_t, target weights w_t, the sum of the weights W,
    the label smoothing), the last two read from consts in the accumulation dtype."""
    t = tl.load(tgt + rows, mask=mr, other=ignore_index)
    valid = mr & (t != ignore_index) & (t >= 0) & (t < C)
    tc = tl.where(valid, t, 0)
    rows64 = rows.to(tl.int64)
    at = bias.dtype.element_ty
    zt = tl.load(x + rows64 * C + tc, mask=valid, other=0.0).to(at)
    if HAS_BIAS:
        zt += tl.load(bias + tc, mask=valid, other=0.0)
    if HAS_W:
        wt = tl.load(w + tc, mask=valid, other=0.0)
    else:
        wt = tl.full(tc.shape, 1.0, at)
    wsum = tl.load(consts + 1)
    return tc, valid, zt, wt, wsum, tl.load(consts + 2)


@triton.jit
def _write_grad(x, bias, w, grad, rows, mr, valid, tc, m, cp, cs, ct, C, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
                BC: tl.constexpr):
    """grad_j = cp * exp(z_j - m) - cs * w_j - ct * [j == t] over the program's rows (0 on invalid rows)."""
    rows64 = rows.to(tl.int64)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < C
        z = _load_z(x, bias, rows64, cols, mr, mc, C, HAS_BIAS)
        p = tl.exp(z - m[:, None])
        if HAS_W:
            wj = tl.load(w + cols, mask=mc, other=0.0)[None, :]
        else:
            wj = 1.0
        g = cp[:, None] * p - cs[:, None] * wj - tl.where(cols[None, :] == tc[:, None], ct[:, None], 0.0)
        g = tl.where(valid[:, None], g, 0.0)
        tl.store(grad + rows64[:, None] * C + cols[None, :], g.to(grad.dtype.element_ty),
                 mask=mr[:, None] & mc[None, :])


@triton.jit
def _fwd_kernel(x, tgt, bias, w, consts, losses, lse, grad, N, C, ignore_index, HAS_BIAS: tl.constexpr,
                HAS_W: tl.constexpr, SMOOTH: tl.constexpr, GRAD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # Rows [pid * BR, (pid + 1) * BR); consts = [gradient scale, sum of the class weights, label smoothing] (a
    # Python float argument would be float32).
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    at = bias.dtype.element_ty
    m = tl.full([BR], float("-inf"), at)
    s = tl.zeros([BR], at)
    sz = tl.zeros([BR], at)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < C
        z = _load_z(x, bias, rows64, cols, mr, mc, C, HAS_BIAS)
        mn = tl.maximum(m, tl.max(z, 1))
        finite = mn != float("-inf")
        mn_safe = tl.where(finite, mn, 0.0)
        alpha = tl.where(finite, tl.exp(m - mn_safe), 0.0)
        s = s * alpha + tl.sum(tl.exp(z - mn_safe[:, None]), 1)
        m = mn
        if SMOOTH:
            inside = mr[:, None] & mc[None, :]
            zin = tl.where(inside, z, 0.0)
            if HAS_W:
                zin = tl.load(w + cols, mask=mc, other=0.0)[None, :] * zin
            sz += tl.sum(zin, 1)
    lse_r = tl.where(mr, m, 0.0) + tl.log(tl.where(mr, s, 1.0))  # padding rows: 0, not -inf
    tc, valid, zt, wt, wsum, eps = _target_terms(x, tgt, bias, w, consts, rows, mr, N, C, ignore_index,
                                                 HAS_BIAS, HAS_W)
    loss = (1.0 - eps) * wt * (lse_r - zt)
    if SMOOTH:
        loss += eps / C * (wsum * lse_r - sz)
    tl.store(losses + rows, tl.where(valid, loss, 0.0), mask=mr)
    tl.store(lse + rows, lse_r, mask=mr)
    if GRAD:
        sc = tl.load(consts)
        cp = sc * ((1.0 - eps) * wt + eps / C * wsum)
        cs = tl.full([BR], 0.0, at) + sc * eps / C
        ct = sc * (1.0 - eps) * wt
        _write_grad(x, bias, w, grad, rows, mr, valid, tc, tl.where(valid, lse_r, 0.0), cp, cs, ct, C, HAS_BIAS,
                    HAS_W, BC)


@triton.jit
def _bwd_kernel(g, x, tgt, bias, w, consts, lse, grad, N, C, ignore_index, ROWS_G: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # g: per-row output gradients [N] (ROWS_G) or one value (already divided by the "mean" denominator).
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    mr = rows < N
    tc, valid, zt, wt, wsum, eps = _target_terms(x, tgt, bias, w, consts, rows, mr, N, C, ignore_index,
                                                 HAS_BIAS, HAS_W)
    if ROWS_G:
        sc = tl.load(g + rows, mask=mr, other=0.0)
    else:
        sc = tl.full([BR], 0.0, wt.dtype) + tl.load(g)
    m = tl.load(lse + rows, mask=valid, other=0.0)
    cp = sc * ((1.0 - eps) * wt + eps / C * wsum)
    cs = sc * eps / C
    ct = sc * (1.0 - eps) * wt
    _write_grad(x, bias, w, grad, rows, mr, valid, tc, tl.where(valid, m, 0.0), cp, cs, ct, C, HAS_BIAS, HAS_W, BC)


def _blocks(C):
    bc = min(MAX_BC, triton.next_power_of_2(max(C, 1)))
    br = max(1, TILE // bc)
    return br, bc


def _prepare(logits, target, bias, weight, ignore_index, reduction):
    """Contiguous operands, the placeholders for a missing bias / weight, the "mean" denominator and the sum of
    the class weights."""
    at = acc_dtype(logits.dtype)
    x = logits.contiguous()
    t = target.contiguous()
    N, C = x.shape
    valid = t != ignore_index
    if weight is None:
        denom = valid.sum().to(at)
        wsum = torch.tensor(float(C), dtype=at, device=x.device)
    else:
        weight = weight.to(at).contiguous()
        denom = (weight[torch.where(valid & (t >= 0) & (t < C), t, 0)] * valid).sum()
        wsum = weight.sum()
    bias_arg = bias.to(at).contiguous() if bias is not None else torch.zeros(1, dtype=at, device=x.device)
    w_arg = weight if weight is not None else bias_arg
    # 1 / denom scales the gradient of "mean"; with every row ignored there is no gradient to scale (0, not inf,
    # so that no inf * 0 is formed on the ignored rows).
    inv = torch.where(valid.any(), 1.0 / denom, torch.zeros((), dtype=at, device=x.device))
    return x, t, bias_arg, w_arg, denom, inv, wsum


@implement("logit_adjusted_ce_fwd", "triton")
def logit_adjusted_ce_fwd_triton(logits, target, bias, weight, ignore_index, reduction, label_smoothing,
                                 compute_grad):
    """Triton twin of fastml::logit_adjusted_ce_fwd (semantics in schema.py)."""
    x, t, b, w, denom, inv, wsum = _prepare(logits, target, bias, weight, ignore_index, reduction)
    N, C = x.shape
    at = acc_dtype(x.dtype)
    scale = inv if reduction == MEAN else torch.ones((), dtype=at, device=x.device)
    consts = torch.tensor([0.0, 0.0, label_smoothing], dtype=at, device=x.device)
    consts[0], consts[1] = scale, wsum
    losses = torch.empty(N, dtype=at, device=x.device)
    lse = torch.empty(N, dtype=at, device=x.device)
    grad = torch.empty((N, C) if compute_grad else (0,), dtype=x.dtype, device=x.device)
    if N > 0:
        br, bc = _blocks(C)
        with device_of(x):
            _fwd_kernel[(triton.cdiv(N, br),)](x, t, b, w, consts, losses, lse, grad if compute_grad else x, N, C,
                                               ignore_index, HAS_BIAS=bias is not None,
                                               HAS_W=weight is not None, SMOOTH=label_smoothing > 0,
                                               GRAD=bool(compute_grad), BR=br, BC=bc)
    if reduction == NONE:
        loss = losses.to(x.dtype)
    elif reduction == MEAN:
        loss = (losses.sum() / denom).to(x.dtype)  # 0 / 0 = NaN when every row is ignored, as PyTorch
    else:
        loss = losses.sum().to(x.dtype)
    return loss, lse, grad


@implement("logit_adjusted_ce_bwd", "triton")
def logit_adjusted_ce_bwd_triton(grad_output, logits, target, bias, weight, lse, ignore_index, reduction,
                                 label_smoothing):
    """Triton twin of fastml::logit_adjusted_ce_bwd (semantics in schema.py)."""
    x, t, b, w, denom, inv, wsum = _prepare(logits, target, bias, weight, ignore_index, reduction)
    N, C = x.shape
    at = acc_dtype(x.dtype)
    g = grad_output.to(at)
    if reduction == MEAN:
        g = g * inv
    g = g.contiguous()
    consts = torch.tensor([1.0, 0.0, label_smoothing], dtype=at, device=x.device)
    consts[1] = wsum
    grad = torch.empty((N, C), dtype=x.dtype, device=x.device)
    if N > 0:
        br, bc = _blocks(C)
        with device_of(x):
            _bwd_kernel[(triton.cdiv(N, br),)](g, x, t, b, w, consts, lse.contiguous(), grad, N, C, ignore_index,
                                               ROWS_G=reduction == NONE,
                                               HAS_BIAS=bias is not None, HAS_W=weight is not None, BR=br, BC=bc)
    return grad

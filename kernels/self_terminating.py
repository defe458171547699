"""Triton kernels of the self-terminating output layer, the kernels of the torch ops
fastml::self_terminating_{fwd,nll_fwd,nll_bwd}_triton (declared in fastml/ops/self_terminating/schema.py).

Each program owns BR rows (b, t) of the logits [B*T, V] and walks their columns in blocks of BC with a running
maximum and a running sum of exp(z - max) over the vocabulary without eos (one read of the logits), then, where an
output row is wanted (log-probabilities, or the gradient), a second walk writes it. The per-row quantities over
[B, T] (log_beta from the eos column, the cumulative log_alpha over T and, in the backward, its reverse cumulative
sum) are a few small torch ops between the launches. Computed in float32 (float64 for float64 logits).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import device_of

MEAN = 1
TILE = 4096
MAX_BC = 4096
LOG_HALF = -math.log(2.0)


@triton.jit
def _lse_kernel(x, lse, N, V, e, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    at = lse.dtype.element_ty
    m = tl.full([BR], float("-inf"), at)
    s = tl.zeros([BR], at)
    for c0 in range(0, V, BC):
        cols = c0 + tl.arange(0, BC)
        keep = (cols < V) & (cols != e)
        z = tl.load(x + rows64[:, None] * V + cols[None, :], mask=mr[:, None] & keep[None, :], other=float("-inf"))
        z = z.to(at)
        mn = tl.maximum(m, tl.max(z, 1))
        finite = mn != float("-inf")
        mn_safe = tl.where(finite, mn, 0.0)
        s = s * tl.where(finite, tl.exp(m - mn_safe), 0.0) + tl.sum(tl.exp(z - mn_safe[:, None]), 1)
        m = mn
    tl.store(lse + rows, tl.where(mr, m, 0.0) + tl.log(tl.where(mr, s, 1.0)), mask=mr)


@triton.jit
def _logp_kernel(x, lse, la, leos, out, N, V, e, BR: tl.constexpr, BC: tl.constexpr):
    """out = z + log_alpha - lse, and log(1 - alpha) in the eos column."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    shift = tl.load(la + rows, mask=mr, other=0.0) - tl.load(lse + rows, mask=mr, other=0.0)
    le = tl.load(leos + rows, mask=mr, other=0.0)
    for c0 in range(0, V, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < V
        msk = mr[:, None] & mc[None, :]
        z = tl.load(x + rows64[:, None] * V + cols[None, :], mask=msk, other=0.0).to(shift.dtype)
        o = tl.where(cols[None, :] == e, le[:, None], z + shift[:, None])
        tl.store(out + rows64[:, None] * V + cols[None, :], o.to(out.dtype.element_ty), mask=msk)


@triton.jit
def _grad_kernel(x, lse, c, y, geos, out, N, V, e, BR: tl.constexpr, BC: tl.constexpr):
    """out = c (exp(z - lse) - [v == y]) for v != eos, geos in the eos column (c = 0 and geos = 0 on padding)."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    l = tl.load(lse + rows, mask=mr, other=0.0)
    cr = tl.load(c + rows, mask=mr, other=0.0)
    yr = tl.load(y + rows, mask=mr, other=-1)
    ge = tl.load(geos + rows, mask=mr, other=0.0)
    for c0 in range(0, V, BC):
        cols = c0 + tl.arange(0, BC)
        mc = cols < V
        msk = mr[:, None] & mc[None, :]
        z = tl.load(x + rows64[:, None] * V + cols[None, :], mask=msk, other=0.0).to(l.dtype)
        p = tl.where(cr[:, None] != 0.0, tl.exp(z - l[:, None]), 0.0)
        g = cr[:, None] * (p - tl.where(cols[None, :] == yr[:, None], 1.0, 0.0))
        g = tl.where(cols[None, :] == e, ge[:, None], g)
        tl.store(out + rows64[:, None] * V + cols[None, :], g.to(out.dtype.element_ty), mask=msk)


def _blocks(V):
    bc = min(MAX_BC, triton.next_power_of_2(max(V, 1)))
    return max(1, TILE // bc), bc


def _lse(x, eos_id):
    B, T, V = x.shape
    N = B * T
    lse = torch.empty((B, T), dtype=acc_dtype(x.dtype), device=x.device)
    if N:
        br, bc = _blocks(V)
        with device_of(x):
            _lse_kernel[(triton.cdiv(N, br),)](x, lse, N, V, eos_id, BR=br, BC=bc)
    return lse


def _log_alpha(x, eos_id, eps, prev=None):
    at = acc_dtype(x.dtype)
    la = torch.cumsum(math.log1p(-eps) + F.logsigmoid(x[..., eos_id].to(at)), dim=1)
    return la if prev is None else la + prev.to(at).unsqueeze(1)


def _log1mexp(a):
    near = a > LOG_HALF
    return torch.where(near, torch.log(-torch.expm1(torch.minimum(a, torch.zeros_like(a)))),
                       torch.log1p(-torch.exp(torch.minimum(a, torch.full_like(a, LOG_HALF)))))


@implement("self_terminating_fwd", "triton")
def self_terminating_fwd_triton(logits, eos_id, eps, log_alpha_prev):
    """Triton twin of fastml::self_terminating_fwd (semantics in schema.py)."""
    x = logits.contiguous()
    B, T, V = x.shape
    la = _log_alpha(x, eos_id, eps, log_alpha_prev)
    lse = _lse(x, eos_id)
    out = torch.empty_like(x)
    if B * T:
        br, bc = _blocks(V)
        with device_of(x):
            _logp_kernel[(triton.cdiv(B * T, br),)](x, lse, la.contiguous(), _log1mexp(la).contiguous(), out,
                                                    B * T, V, eos_id, BR=br, BC=bc)
    return out, la, lse


def _grad(g, x, target, lengths, lse, la, eos_id):
    """The gradient of sum(g * nll) (g [B, T] in the accumulation dtype)."""
    B, T, V = x.shape
    real = torch.arange(T, device=x.device) < lengths.unsqueeze(1)
    g = torch.where(real, g, torch.zeros_like(g))
    is_eos = target == eos_id
    d = torch.where(is_eos, 1.0 / torch.expm1(-la), -torch.ones_like(la))   # d nll_t / d log_alpha_t
    G = torch.flip(torch.cumsum(torch.flip(g * d, (1,)), 1), (1,))
    geos = torch.where(real, G * torch.sigmoid(-x[..., eos_id].to(la.dtype)), torch.zeros_like(G))
    c = torch.where(is_eos, torch.zeros_like(g), g)
    out = torch.empty_like(x)
    if B * T:
        br, bc = _blocks(V)
        with device_of(x):
            _grad_kernel[(triton.cdiv(B * T, br),)](x, lse, c.contiguous(), target.contiguous(), geos.contiguous(),
                                                    out, B * T, V, eos_id, BR=br, BC=bc)
    return out


@implement("self_terminating_nll_fwd", "triton")
def self_terminating_nll_fwd_triton(logits, target, lengths, eos_id, eps, reduction, compute_grad):
    """Triton twin of fastml::self_terminating_nll_fwd (semantics in schema.py)."""
    x = logits.contiguous()
    B, T, V = x.shape
    at = acc_dtype(x.dtype)
    real = torch.arange(T, device=x.device) < lengths.unsqueeze(1)
    la = _log_alpha(x, eos_id, eps)
    lse = torch.where(real, _lse(x, eos_id), torch.zeros((), dtype=at, device=x.device))
    y = torch.where(real, target, torch.zeros_like(target))
    zy = x.gather(-1, y.unsqueeze(-1)).squeeze(-1).to(at)
    nll = torch.where(y == eos_id, -_log1mexp(la), -(la + zy - lse))
    nll = torch.where(real, nll, torch.zeros_like(nll))
    if compute_grad:
        scale = 1.0 / lengths.sum().to(at) if reduction == MEAN else torch.ones((), dtype=at, device=x.device)
        grad = _grad(scale.expand(B, T).contiguous(), x, y, lengths, lse, la, eos_id)
    else:
        grad = x.new_empty((0,))
    return nll, lse, la, grad


@implement("self_terminating_nll_bwd", "triton")
def self_terminating_nll_bwd_triton(grad_nll, logits, target, lengths, lse, log_alpha, eos_id):
    """Triton twin of fastml::self_terminating_nll_bwd (semantics in schema.py)."""
    T = logits.shape[1]
    real = torch.arange(T, device=logits.device) < lengths.unsqueeze(1)
    y = torch.where(real, target, torch.zeros_like(target))
    return _grad(grad_nll, logits.contiguous(), y, lengths, lse, log_alpha, eos_id)

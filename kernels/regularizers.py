"""Triton kernels of softmax_kl, the kernels of the torch ops fastml::softmax_kl_fwd_triton and
fastml::softmax_kl_bwd_triton (declared in fastml/ops/regularizers/schema.py).

Each program owns BR rows and walks their columns in blocks of BC, keeping for a = p / T and b = q / T the running
maxima, the running sums of exp(a - max_a) and exp(b - max_b) and the running sum of exp(a - max_a) (a - b), all
rescaled when a maximum grows: one read of the logits gives both log-sum-exps and E_P[a - b]. The gradients, when
wanted, are written by a second walk over the same rows. Computed in float32 (float64 for float64 logits).
"""
import torch
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import device_of

TILE = 4096
MAX_BC = 2048


@triton.jit
def _load_rows(p, q, rows64, mr, c0, C, inv_t, at, BC: tl.constexpr):
    """Columns [c0, c0 + BC) of rows `rows64` of both logit matrices, divided by the temperature (-inf where
    masked), with the offsets and mask to store results at the same places."""
    cols = c0 + tl.arange(0, BC)
    msk = mr[:, None] & (cols < C)[None, :]
    off = rows64[:, None] * C + cols[None, :]
    a = tl.load(p + off, mask=msk, other=float("-inf")).to(at) * inv_t
    b = tl.load(q + off, mask=msk, other=float("-inf")).to(at) * inv_t
    return a, b, off, msk


@triton.jit
def _grad_rows(p, q, dp, dq, rows64, mr, C, inv_t, k, lse_a, lse_b, ev, at, BC: tl.constexpr):
    for c0 in range(0, C, BC):
        a, b, off, msk = _load_rows(p, q, rows64, mr, c0, C, inv_t, at, BC)
        pa = tl.exp(a - lse_a[:, None])
        qb = tl.exp(b - lse_b[:, None])
        gp = tl.where(pa > 0, k[:, None] * pa * (a - b - ev[:, None]), 0.0)
        gq = k[:, None] * (qb - pa)
        tl.store(dp + off, gp.to(dp.dtype.element_ty), mask=msk)
        tl.store(dq + off, gq.to(dq.dtype.element_ty), mask=msk)


@triton.jit
def _fwd_kernel(p, q, consts, kl, stats, dp, dq, N, C, GRAD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    at = kl.dtype.element_ty
    inv_t = tl.load(consts)
    ma = tl.full([BR], float("-inf"), at)
    mb = tl.full([BR], float("-inf"), at)
    sa = tl.zeros([BR], at)
    sb = tl.zeros([BR], at)
    t = tl.zeros([BR], at)
    for c0 in range(0, C, BC):
        a, b, off, msk = _load_rows(p, q, rows64, mr, c0, C, inv_t, at, BC)
        na = tl.maximum(ma, tl.max(a, axis=1))
        nb = tl.maximum(mb, tl.max(b, axis=1))
        ca = tl.where(na == float("-inf"), 0.0, na)
        cb = tl.where(nb == float("-inf"), 0.0, nb)
        fa = tl.exp(ma - ca)
        ea = tl.exp(a - ca[:, None])
        sa = sa * fa + tl.sum(ea, axis=1)
        t = t * fa + tl.sum(tl.where(ea > 0, ea * (a - b), 0.0), axis=1)
        sb = sb * tl.exp(mb - cb) + tl.sum(tl.exp(b - cb[:, None]), axis=1)
        ma = na
        mb = nb
    lse_a = ma + tl.log(sa)
    lse_b = mb + tl.log(sb)
    ev = t / sa
    tl.store(kl + rows64, ev - lse_a + lse_b, mask=mr)
    tl.store(stats + rows64 * 3, lse_a, mask=mr)
    tl.store(stats + rows64 * 3 + 1, lse_b, mask=mr)
    tl.store(stats + rows64 * 3 + 2, ev, mask=mr)
    if GRAD:
        k = tl.zeros([BR], at) + tl.load(consts + 1) * inv_t
        _grad_rows(p, q, dp, dq, rows64, mr, C, inv_t, k, lse_a, lse_b, ev, at, BC)


@triton.jit
def _bwd_kernel(g, p, q, consts, stats, dp, dq, N, C, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = rows < N
    rows64 = rows.to(tl.int64)
    at = stats.dtype.element_ty
    inv_t = tl.load(consts)
    lse_a = tl.load(stats + rows64 * 3, mask=mr, other=0.0)
    lse_b = tl.load(stats + rows64 * 3 + 1, mask=mr, other=0.0)
    ev = tl.load(stats + rows64 * 3 + 2, mask=mr, other=0.0)
    k = tl.load(g + rows64, mask=mr, other=0.0) * inv_t
    _grad_rows(p, q, dp, dq, rows64, mr, C, inv_t, k, lse_a, lse_b, ev, at, BC)


def _blocks(C):
    bc = min(MAX_BC, max(16, triton.next_power_of_2(max(C, 1))))
    return max(1, TILE // bc), bc


@implement("softmax_kl_fwd", "triton")
def softmax_kl_fwd_triton(p, q, temperature, grad_scale, compute_grad):
    from fastml.ops.regularizers.schema import FWD

    kl, stats, dp, dq = FWD.fake(p, q, temperature, grad_scale, compute_grad)
    N, C = p.shape
    if N > 0:
        consts = torch.tensor([1.0 / temperature, grad_scale], dtype=acc_dtype(p.dtype), device=p.device)
        br, bc = _blocks(C)
        with device_of(p):
            _fwd_kernel[(triton.cdiv(N, br),)](p, q, consts, kl, stats, dp if compute_grad else kl,
                                                dq if compute_grad else kl, N, C, GRAD=bool(compute_grad), BR=br,
                                                BC=bc)
    return kl, stats, dp, dq


@implement("softmax_kl_bwd", "triton")
def softmax_kl_bwd_triton(grad, p, q, stats, temperature):
    dp, dq = torch.empty_like(p), torch.empty_like(q)
    N, C = p.shape
    if N > 0:
        consts = torch.tensor([1.0 / temperature], dtype=acc_dtype(p.dtype), device=p.device)
        br, bc = _blocks(C)
        with device_of(p):
            _bwd_kernel[(triton.cdiv(N, br),)](grad, p, q, consts, stats, dp, dq, N, C, BR=br, BC=bc)
    return dp, dq

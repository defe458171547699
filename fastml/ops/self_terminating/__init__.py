"""The self-terminating output layer (Welleck et al., "Consistency of a recurrent language model with respect to
incomplete decoding", 2020): public functions, validation, autograd and backend registration.

Backends: `reference` (reference.py), `cpp` (csrc/cpu/self_terminating.cpp, the CPU kernels of the torch ops
fastml::self_terminating_{fwd,nll_fwd,nll_bwd}) and `triton` (kernels/self_terminating.py, behind the twins
fastml::self_terminating_*_triton). The ops are declared in schema.py; the maths, the decisions and the
measurements are in README.md beside this file.
"""
from typing import Callable, NamedTuple

import torch

from fastml import _backend
from fastml._args import floating_tensor, is_real
from fastml._autograd import refuse_double_backward, scale_fused_grads
from fastml._numerics import acc_dtype
from fastml.ops.self_terminating import reference, schema  # noqa: F401  (schema declares the kernel ops)
from fastml.ops.self_terminating.reference import REDUCTIONS

LOG_SOFTMAX_OP = "self_terminating_log_softmax"
NLL_OP = "self_terminating_nll"
NONE, MEAN, SUM = REDUCTIONS["none"], REDUCTIONS["mean"], REDUCTIONS["sum"]


class _Impl(NamedTuple):
    """What a backend runs: `log_softmax(logits [B, T, V], eos_id, eps, log_alpha_prev [B] or None) -> (logp,
    log_alpha)` and `nll(logits, target, lengths, eos_id, eps, reduction_code) -> loss`, both differentiable."""

    log_softmax: Callable
    nll: Callable


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _eager():
    return not torch.compiler.is_compiling()


def _check_logits(logits, dims):
    floating_tensor(logits, "logits")
    if logits.dim() not in dims:
        want = " or ".join({2: "[B, V]", 3: "[B, T, V]"}[d] for d in dims)
        raise ValueError(f"logits must be {want}, got shape {list(logits.shape)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits need a vocabulary of at least 2 (eos and one other token), got shape "
                         f"{list(logits.shape)}")


def _check_eos(eos_id, V):
    if isinstance(eos_id, torch.Tensor) and eos_id.numel() == 1 and not eos_id.is_floating_point():
        eos_id = int(eos_id)
    if not isinstance(eos_id, int) or isinstance(eos_id, bool):
        raise TypeError(f"eos_id must be an int, got {type(eos_id).__name__}")
    if not 0 <= eos_id < V:
        raise IndexError(f"eos_id must be in [0, {V}) (the vocabulary), got {eos_id}")
    return eos_id


def _check_eps(eps):
    if not is_real(eps):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return eps


def _check_log_alpha_prev(prev, logits):
    if prev is None:
        return None
    if not isinstance(prev, torch.Tensor):
        raise TypeError(f"log_alpha_prev must be a tensor, got {type(prev).__name__}")
    if not prev.is_floating_point():
        raise TypeError(f"log_alpha_prev must be a floating tensor, got dtype {prev.dtype}")
    B = logits.shape[0]
    if prev.shape != (B,):
        raise ValueError(f"log_alpha_prev must have shape [B] = [{B}], got {list(prev.shape)}")
    if prev.device != logits.device:
        raise ValueError(f"log_alpha_prev is on {prev.device} but the logits are on {logits.device}")
    if _eager() and B and not bool((prev <= 0).all()):
        raise ValueError("log_alpha_prev must be <= 0 (a log-probability) and not NaN")
    return prev.to(acc_dtype(logits.dtype))


def _check_target_mask(target, mask, logits):
    """Returns (target int64 [B, T], lengths int64 [B])."""
    B, T, V = logits.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of token ids, got dtype {target.dtype}")
    if target.shape != (B, T):
        raise ValueError(f"target must have shape [B, T] = [{B}, {T}], got {list(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but the logits are on {logits.device}")
    if mask is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=logits.device)
        real = None
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = a real token), got dtype {mask.dtype}")
        if mask.shape != (B, T):
            raise ValueError(f"mask must have shape [B, T] = [{B}, {T}], got {list(mask.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"mask is on {mask.device} but the logits are on {logits.device}")
        if _eager() and T > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError("mask must be right-padded: in each row a run of True (real tokens) then False")
        lengths = mask.sum(1)
        real = mask
    target = target.long()
    if _eager() and B * T:
        bad = (target < 0) | (target >= V)
        if real is not None:
            bad &= real
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise IndexError(f"target[{b}, {t}] = {int(target[b, t])} is out of range [0, {V}) (the vocabulary)")
    return target.contiguous(), lengths.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def self_terminating_log_softmax(logits, eos_id, *, eps=1e-3, log_alpha_prev=None, backend="auto"):
    """The self-terminating model's log-probabilities: (log p, log_alpha).

    With z the logits and e = eos_id: beta_t = (1 - eps) sigmoid(z_t[e]), log_alpha_t = log_alpha_{t-1} +
    log beta_t (log_alpha_0 = 0, or `log_alpha_prev`), log p_t(e) = log(1 - alpha_t) and, for v != e,
    log p_t(v) = log_alpha_t + log softmax over the vocabulary without e of z_t. So p_t(e) >= 1 - (1 - eps)^t.

    logits [B, V] is one step (log_alpha comes back [B]); [B, T, V] is a whole sequence (log_alpha [B, T], the
    cumulative sum over T). log p has the logits' dtype; log_alpha the accumulation dtype (float64 for float64,
    float32 otherwise). log_alpha_prev [B] (<= 0) continues a sequence; gradients reach logits and log_alpha_prev.
    """
    _check_logits(logits, (2, 3))
    eos_id = _check_eos(eos_id, logits.shape[-1])
    eps = _check_eps(eps)
    prev = _check_log_alpha_prev(log_alpha_prev, logits)
    chosen = _backend.select(LOG_SOFTMAX_OP, _backend.Call(logits.device, logits.dtype), backend)
    one_step = logits.dim() == 2
    x = logits.unsqueeze(1) if one_step else logits
    lp, la = chosen.impl.log_softmax(x, eos_id, eps, prev)
    if one_step:
        return lp.squeeze(1), la.squeeze(1)
    return lp, la


def self_terminating_nll(logits, target, eos_id, *, eps=1e-3, mask=None, reduction="mean", backend="auto"):
    """Negative log-likelihood of `target` under the self-terminating model, fused: the [B, T, V] log-probabilities
    are never formed (each row needs only its log-sum-exp without eos, its eos logit and its target's logit).

    logits [B, T, V]; target [B, T] integer ids in [0, V) (not read at padding); mask [B, T] bool (True = a real
    token), right-padded, or None (all real). reduction "mean" (over real tokens), "sum", or "none" ([B, T], 0 at
    padding); the result has the logits' dtype. Gradients flow through the cumulative log_alpha.
    """
    _check_logits(logits, (3,))
    eos_id = _check_eos(eos_id, logits.shape[-1])
    eps = _check_eps(eps)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    target, lengths = _check_target_mask(target, mask, logits)
    chosen = _backend.select(NLL_OP, _backend.Call(logits.device, logits.dtype), backend)
    return chosen.impl.nll(logits, target, lengths, eos_id, eps, REDUCTIONS[reduction])


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _log_softmax_grad(grad_lp, grad_la, logits, lse, log_alpha, eos_id):
    """Gradients (logits, log_alpha_prev) of the log-probabilities from the kernels' saved lse and log_alpha, in
    torch ops (a handful of elementwise passes; the fused kernel work is the NLL's)."""
    ad = lse.dtype
    z = logits.to(ad)
    e = eos_id
    direct = torch.zeros_like(log_alpha)
    if grad_la is not None:
        direct = direct + grad_la.to(ad)
    if grad_lp is not None:
        gl = grad_lp.to(ad)
        s = gl.sum(-1) - gl[..., e]                                        # sum over v != e
        grad = gl - torch.exp(z - lse.unsqueeze(-1)) * s.unsqueeze(-1)
        direct = direct + s - gl[..., e] / torch.expm1(-log_alpha)
    else:
        grad = torch.zeros_like(z)
    G = torch.flip(torch.cumsum(torch.flip(direct, (1,)), 1), (1,))      # reverse cumulative sum over T
    grad[..., e] = G * torch.sigmoid(-z[..., e])
    return grad.to(logits.dtype), G[:, 0]


def _kernel_impl(fwd, nll_fwd, nll_bwd):
    """A kernel backend from its three torch ops (see schema.py)."""

    class _LogSoftmaxFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, eos_id, eps, prev):
            lp, la, lse = fwd(logits, eos_id, eps, prev)
            ctx.eos_id = eos_id
            ctx.save_for_backward(logits, lse, la)
            return lp, la

        @staticmethod
        def backward(ctx, grad_lp, grad_la):
            refuse_double_backward("self-terminating kernels")
            logits, lse, la = ctx.saved_tensors
            g, gprev = _log_softmax_grad(grad_lp, grad_la, logits, lse, la, ctx.eos_id)
            return g, None, None, gprev if ctx.needs_input_grad[3] else None

    class _NllFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, lengths, eos_id, eps, reduction):
            fuse = ctx.needs_input_grad[0] and reduction != NONE
            nll, lse, la, grad = nll_fwd(logits, target, lengths, eos_id, eps, reduction, fuse)
            ctx.args = (eos_id, reduction)
            ctx.compiled = torch.compiler.is_compiling() and fuse
            if ctx.compiled:
                ctx.save_for_backward(logits, target, lengths, lse, la, grad)
            else:
                ctx.save_for_backward(logits, target, lengths, lse, la)
                ctx.buffer = grad if fuse else None
            if reduction == NONE:
                return nll.to(logits.dtype)
            total = nll.sum()
            if reduction == MEAN:
                total = total / lengths.sum()
            return total.to(logits.dtype)

        @staticmethod
        def backward(ctx, grad_out):
            refuse_double_backward("self-terminating kernels")
            eos_id, reduction = ctx.args
            if ctx.compiled:
                logits, target, lengths, lse, la, grad = ctx.saved_tensors
                return grad * grad_out.to(grad.dtype), None, None, None, None, None
            logits, target, lengths, lse, la = ctx.saved_tensors
            buffer, ctx.buffer = ctx.buffer, None  # a retained graph's second backward recomputes
            if buffer is not None:
                buffer, = scale_fused_grads([buffer], grad_out)
                return buffer, None, None, None, None, None
            B, T, _ = logits.shape
            g = grad_out.to(lse.dtype)
            if reduction == MEAN:
                g = g / lengths.sum()
            g = g.expand(B, T).contiguous()
            grad = nll_bwd(g, logits, target, lengths, lse, la, eos_id)
            return grad, None, None, None, None, None

    def log_softmax(logits, eos_id, eps, prev):
        return _LogSoftmaxFn.apply(logits, eos_id, eps, prev)

    def nll(logits, target, lengths, eos_id, eps, reduction):
        return _NllFn.apply(logits, target, lengths, eos_id, eps, reduction)

    return _Impl(log_softmax, nll)


def _reference_nll(logits, target, lengths, eos_id, eps, reduction):
    T = logits.shape[1]
    mask = torch.arange(T, device=logits.device) < lengths.unsqueeze(1)
    return reference.self_terminating_nll(logits, target, eos_id, eps, mask, reference.REDUCTION_NAMES[reduction])


def _register():
    ops = torch.ops.fastml
    ref = _Impl(lambda x, e, eps, prev: reference.self_terminating_log_softmax(x, e, eps, prev), _reference_nll)
    cpp = _kernel_impl(ops.self_terminating_fwd, ops.self_terminating_nll_fwd, ops.self_terminating_nll_bwd)
    triton = _kernel_impl(ops.self_terminating_fwd_triton, ops.self_terminating_nll_fwd_triton,
                          ops.self_terminating_nll_bwd_triton)
    for op in (LOG_SOFTMAX_OP, NLL_OP):
        _backend.register(op, _backend.Backend("reference", ref))
        _backend.register(op, _backend.Backend("cpp", cpp))
        _backend.register(op, _backend.Backend("triton", triton))


_register()

__all__ = ["self_terminating_log_softmax", "self_terminating_nll"]

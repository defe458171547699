"""The kernel ops of the self-terminating output layer, declared once for the C++ kernels
(fastml::self_terminating_{fwd,nll_fwd,nll_bwd}) and their Triton twins (fastml::self_terminating_*_triton).

Shapes: logits [B, T, V] (float32, float64, float16, bfloat16; V >= 2), eos_id in [0, V), eps in (0, 1). A is the
accumulation dtype (float64 for float64 logits, float32 otherwise). Per row (b, t), with e = eos_id:
lse = logsumexp_{v != e} z_v, log_beta = log(1 - eps) + logsigmoid(z_e), log_alpha_t = log_alpha_{t-1} + log_beta_t
(log_alpha_0 = log_alpha_prev[b], or 0).

- self_terminating_fwd(logits, eos_id, eps, log_alpha_prev [B] A or None) -> (logp [B, T, V] logits' dtype,
  log_alpha [B, T] A, lse [B, T] A): logp[v] = log_alpha + z_v - lse for v != e, logp[e] = log(1 - alpha).
- self_terminating_nll_fwd(logits, target [B, T] int64, lengths [B] int64 in [0, T], eos_id, eps, reduction,
  compute_grad) -> (nll [B, T] A, lse [B, T] A, log_alpha [B, T] A, grad): nll = -logp[target] for t < lengths[b],
  0 after (targets there are not read). reduction (0 none, 1 mean, 2 sum) only sets the scale of grad: with
  compute_grad, grad [B, T, V] (logits' dtype) is the gradient of sum(nll) / sum(lengths) (mean) or of sum(nll)
  (none, sum); else an empty [0] tensor. The logp tensor is never formed.
- self_terminating_nll_bwd(grad_nll [B, T] A, logits, target, lengths, lse, log_alpha, eos_id) -> grad [B, T, V]:
  the gradient of sum(grad_nll * nll) (positions t >= lengths[b] contribute nothing), including the reverse
  cumulative sum through log_alpha into each step's eos logit.
"""
import torch

from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype


def _fail(cls, msg):
    raise cls(f"fastml::self_terminating: {msg}")


def _check_logits(logits, eos_id):
    if logits.dim() != 3 or not logits.is_floating_point():
        _fail(ValueError, f"logits must be a 3-D floating tensor [B, T, V], got {logits.dtype} "
                          f"{list(logits.shape)}")
    V = logits.shape[2]
    if V < 2:
        _fail(ValueError, f"logits need V >= 2 (eos and at least one other token), got V = {V}")
    if not 0 <= eos_id < V:
        _fail(IndexError, f"eos_id must be in [0, {V}), got {eos_id}")


def _check_eps(eps):
    if not 0.0 < eps < 1.0:
        _fail(ValueError, f"eps must be in (0, 1), got {eps}")


def _check_bt(t, name, B, T, dtype, device):
    if t.shape != (B, T) or t.dtype != dtype or t.device != device:
        _fail(ValueError, f"{name} must be a {dtype} tensor of shape [{B}, {T}] on {device}, got {t.dtype} "
                          f"{list(t.shape)} on {t.device}")


def _check_targets(logits, target, lengths):
    B, T, V = logits.shape
    _check_bt(target, "target", B, T, torch.int64, logits.device)
    if lengths.shape != (B,) or lengths.dtype != torch.int64 or lengths.device != logits.device:
        _fail(ValueError, f"lengths must be an int64 tensor of shape [{B}] on {logits.device}, got "
                          f"{lengths.dtype} {list(lengths.shape)} on {lengths.device}")
    if B * T == 0:
        return
    real = torch.arange(T, device=logits.device) < lengths.unsqueeze(1)
    ok_len = ((lengths >= 0) & (lengths <= T)).all()
    ok_tgt = (~real | ((target >= 0) & (target < V))).all()
    if logits.is_cuda:
        torch._assert_async(ok_len, "fastml::self_terminating: lengths out of range [0, T]")
        torch._assert_async(ok_tgt, "fastml::self_terminating: target out of range [0, V)")
        return
    if not bool(ok_len):
        _fail(ValueError, f"lengths must be in [0, {T}]")
    if not bool(ok_tgt):
        _fail(IndexError, f"target must be in [0, {V}) at every position t < lengths[b]")


def _check_fwd(logits, eos_id, eps, log_alpha_prev):
    _check_logits(logits, eos_id)
    _check_eps(eps)
    if log_alpha_prev is not None:
        B = logits.shape[0]
        ad = acc_dtype(logits.dtype)
        if log_alpha_prev.shape != (B,) or log_alpha_prev.dtype != ad or log_alpha_prev.device != logits.device:
            _fail(ValueError, f"log_alpha_prev must be a {ad} tensor of shape [{B}] on {logits.device}, got "
                              f"{log_alpha_prev.dtype} {list(log_alpha_prev.shape)} on {log_alpha_prev.device}")


def _check_nll_fwd(logits, target, lengths, eos_id, eps, reduction, compute_grad):
    _check_logits(logits, eos_id)
    _check_eps(eps)
    if reduction not in (0, 1, 2):
        _fail(ValueError, f"reduction must be 0, 1 or 2, got {reduction}")
    _check_targets(logits, target, lengths)


def _check_nll_bwd(grad_nll, logits, target, lengths, lse, log_alpha, eos_id):
    _check_logits(logits, eos_id)
    _check_targets(logits, target, lengths)
    B, T, _ = logits.shape
    ad = acc_dtype(logits.dtype)
    for t, name in ((grad_nll, "grad_nll"), (lse, "lse"), (log_alpha, "log_alpha")):
        _check_bt(t, name, B, T, ad, logits.device)


def _fwd(logits, eos_id, eps, log_alpha_prev):
    B, T, _ = logits.shape
    ad = acc_dtype(logits.dtype)
    return (logits.new_empty(logits.shape), logits.new_empty((B, T), dtype=ad), logits.new_empty((B, T), dtype=ad))


def _nll_fwd(logits, target, lengths, eos_id, eps, reduction, compute_grad):
    B, T, _ = logits.shape
    ad = acc_dtype(logits.dtype)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return (logits.new_empty((B, T), dtype=ad), logits.new_empty((B, T), dtype=ad),
            logits.new_empty((B, T), dtype=ad), grad)


def _nll_bwd(grad_nll, logits, target, lengths, lse, log_alpha, eos_id):
    return logits.new_empty(logits.shape)


FWD = OpSchema("self_terminating_fwd",
               "(Tensor logits, int eos_id, float eps, Tensor? log_alpha_prev) -> (Tensor, Tensor, Tensor)",
               _fwd, check=_check_fwd)
NLL_FWD = OpSchema("self_terminating_nll_fwd",
                   "(Tensor logits, Tensor target, Tensor lengths, int eos_id, float eps, int reduction, "
                   "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)", _nll_fwd, check=_check_nll_fwd)
NLL_BWD = OpSchema("self_terminating_nll_bwd",
                   "(Tensor grad_nll, Tensor logits, Tensor target, Tensor lengths, Tensor lse, Tensor log_alpha, "
                   "int eos_id) -> Tensor", _nll_bwd, check=_check_nll_bwd)
declare(FWD, NLL_FWD, NLL_BWD)

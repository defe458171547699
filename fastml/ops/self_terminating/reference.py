"""Plain-PyTorch definition of the self-terminating language model's output layer: the truth the kernels are
checked against.

With z_t the logits at step t and e the end-of-sequence id:

    beta_t = (1 - eps) * sigmoid(z_t[e]),   log_alpha_t = log_alpha_{t-1} + log(beta_t)   (log_alpha_0 = 0)
    log p_t(e) = log(1 - alpha_t),          log p_t(v) = log_alpha_t + z_t[v] - logsumexp_{u != e} z_t[u]

Everything is computed in log space in the accumulation dtype (float32 for float32 and half inputs, float64 for
float64); log-probabilities come back in the logits' dtype, log_alpha in the accumulation dtype.
"""
import math

import torch
import torch.nn.functional as F

from fastml._numerics import acc_dtype

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {v: k for k, v in REDUCTIONS.items()}
LOG_HALF = -math.log(2.0)


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's switch at -log 2): log(-expm1(x)) near 0,
    log1p(-exp(x)) below. Both branches see safe inputs, so the gradient of the branch not taken is never NaN."""
    near = x > LOG_HALF
    a = torch.where(near, x, torch.full_like(x, LOG_HALF))
    b = torch.where(near, torch.full_like(x, LOG_HALF), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def log_beta(z_eos, eps):
    """log((1 - eps) * sigmoid(z_eos))."""
    return math.log1p(-eps) + F.logsigmoid(z_eos)


def self_terminating_log_softmax(logits, eos_id, eps=1e-3, log_alpha_prev=None):
    """(log-probabilities like logits, log_alpha): logits [B, T, V] -> [B, T, V], [B, T]; [B, V] -> [B, V], [B].
    log_alpha_prev [B] or None. Differentiable in logits and log_alpha_prev (double backward included)."""
    one_step = logits.dim() == 2
    z = logits.to(acc_dtype(logits.dtype))
    if one_step:
        z = z.unsqueeze(1)
    lb = log_beta(z[..., eos_id], eps)                         # [B, T]
    log_alpha = torch.cumsum(lb, dim=1)
    if log_alpha_prev is not None:
        log_alpha = log_alpha + log_alpha_prev.to(z.dtype).unsqueeze(1)
    is_eos = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
    is_eos[eos_id] = True
    rest = torch.log_softmax(z.masked_fill(is_eos, float("-inf")), dim=-1)   # over the vocabulary without eos
    lp = torch.where(is_eos, log1mexp(log_alpha).unsqueeze(-1), rest + log_alpha.unsqueeze(-1))
    if one_step:
        lp, log_alpha = lp.squeeze(1), log_alpha.squeeze(1)
    return lp.to(logits.dtype), log_alpha


def self_terminating_nll(logits, target, eos_id, eps=1e-3, mask=None, reduction="mean"):
    """-log p_t(target_t) under the self-terminating model: logits [B, T, V], target [B, T] (ids; not read where
    mask is False), mask [B, T] bool (right-padded) or None. "none": [B, T] with 0 at padding; "sum"; "mean" over
    real tokens. In the logits' dtype."""
    lp, _ = self_terminating_log_softmax(logits.to(acc_dtype(logits.dtype)), eos_id, eps)
    if mask is None:
        mask = torch.ones(target.shape, dtype=torch.bool, device=target.device)
    t = torch.where(mask, target.long(), torch.zeros_like(target, dtype=torch.long))
    nll = -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(mask, nll, torch.zeros_like(nll))
    if reduction == "none":
        out = nll
    elif reduction == "sum":
        out = nll.sum()
    else:
        out = nll.sum() / mask.sum()
    return out.to(logits.dtype)

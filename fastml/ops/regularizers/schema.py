"""The kernel ops of softmax_kl, declared once for the C++ kernels (fastml::softmax_kl_{fwd,bwd}) and their Triton
twins (fastml::softmax_kl_{fwd,bwd}_triton).

Shapes: p, q [N, C] contiguous, one floating dtype. With a = p / T, b = q / T, P = softmax(a), Q = softmax(b)
(computed in float32, float64 for float64 inputs):

    kl_i = sum_j P_ij (a_ij - b_ij) - lse(a_i) + lse(b_i),   dkl_i/dp = P (a - b - E_i) / T,
    dkl_i/dq = (Q - P) / T,  with E_i = sum_j P_ij (a_ij - b_ij)

- softmax_kl_fwd(p, q, temperature, grad_scale, compute_grad) -> (kl [N], stats [N, 3], dp, dq): kl and stats
  (lse(a), lse(b), E per row) in the accumulation dtype; with compute_grad, dp and dq are the gradients of
  grad_scale * sum_i kl_i in p's dtype (otherwise empty [0] tensors).
- softmax_kl_bwd(grad [N], p, q, stats, temperature) -> (dp, dq): the gradients of sum_i grad_i kl_i, from the
  forward's stats.
"""
import math

import torch

from fastml._backend import ALL_FLOATS
from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype

FLOATS = ALL_FLOATS


def _logits(p, q):
    for t, name in ((p, "p_logits"), (q, "q_logits")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [N, C], got shape {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if q.shape != p.shape:
        raise ValueError(f"q_logits must have p_logits' shape {list(p.shape)}, got {list(q.shape)}")
    if q.dtype != p.dtype or q.device != p.device:
        raise TypeError(f"q_logits must have p_logits' dtype and device ({p.dtype}, {p.device}), got {q.dtype} on "
                        f"{q.device}")


def _temperature(temperature):
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


def check_fwd(p, q, temperature, grad_scale, compute_grad):
    _logits(p, q)
    _temperature(temperature)


def check_bwd(grad, p, q, stats, temperature):
    _logits(p, q)
    _temperature(temperature)
    acc, N = acc_dtype(p.dtype), p.shape[0]
    if not isinstance(grad, torch.Tensor) or grad.shape != (N,) or grad.dtype != acc or not grad.is_contiguous():
        raise ValueError(f"grad must be a contiguous [{N}] {acc} tensor")
    if not isinstance(stats, torch.Tensor) or stats.shape != (N, 3) or stats.dtype != acc or not stats.is_contiguous():
        raise ValueError(f"stats must be a contiguous [{N}, 3] {acc} tensor")


def _fwd(p, q, temperature, grad_scale, compute_grad):
    acc = acc_dtype(p.dtype)
    N = p.shape[0]
    dp = torch.empty_like(p) if compute_grad else p.new_empty((0,))
    dq = torch.empty_like(p) if compute_grad else p.new_empty((0,))
    return p.new_empty((N,), dtype=acc), p.new_empty((N, 3), dtype=acc), dp, dq


def _bwd(grad, p, q, stats, temperature):
    return torch.empty_like(p), torch.empty_like(q)


FWD = OpSchema("softmax_kl_fwd", "(Tensor p, Tensor q, float temperature, float grad_scale, bool compute_grad) -> "
               "(Tensor, Tensor, Tensor, Tensor)", _fwd, check=check_fwd)
BWD = OpSchema("softmax_kl_bwd", "(Tensor grad, Tensor p, Tensor q, Tensor stats, float temperature) -> "
               "(Tensor, Tensor)", _bwd, check=check_bwd)
declare(FWD, BWD)

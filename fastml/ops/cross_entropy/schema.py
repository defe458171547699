"""The kernel ops of logit-adjusted cross-entropy, declared once for the C++ kernels
(fastml::logit_adjusted_ce_{fwd,bwd}) and their Triton twins (fastml::logit_adjusted_ce_{fwd,bwd}_triton).

Shapes: logits [N, C] (float32, float64, float16, bfloat16), target [N] int64 (class ids in [0, C) or
ignore_index), bias [C] or None (tau * log_prior, in the accumulation dtype: float64 for float64 logits, float32
otherwise), weight [C] or None (class weights, accumulation dtype). reduction is an int code: 0 none, 1 mean,
2 sum. With z = logits + bias, lse_i = log sum_j exp(z_ij), w_j the class weight (1 without weights), W = sum_j w_j
and e the label smoothing:

    loss_i = (1 - e) w_t (lse_i - z_it) + e / C * (W lse_i - sum_j w_j z_ij)        (0 where t = ignore_index)

reduced as PyTorch does: "mean" divides the sum by the sum of the targets' weights over rows not ignored.

- logit_adjusted_ce_fwd(..., compute_grad) -> (loss, lse [N], grad): loss [N] for "none", else a 0-d tensor, in
  the logits' dtype; lse in the accumulation dtype (garbage on ignored rows). grad is d(loss.sum())/d logits
  [N, C] in the logits' dtype (for "mean" divided by the denominator; ignored rows zero) when compute_grad, else
  an empty [0] tensor.
- logit_adjusted_ce_bwd(grad_output, logits, target, bias, weight, lse, ...) -> grad_logits [N, C]: the gradient
  from the forward's lse; grad_output is [N] for "none", 0-d otherwise (accumulation dtype).
"""
import torch

from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype


def _fail(cls, msg):
    raise cls(f"fastml::logit_adjusted_ce: {msg}")


def _check_vector(t, name, n, dtype, device):
    if t.shape != (n,) or t.dtype != dtype or t.device != device:
        _fail(ValueError, f"{name} must be a {dtype} tensor of shape [{n}] on {device}, got {t.dtype} "
                          f"{list(t.shape)} on {t.device}")


def _check_fwd(logits, target, bias, weight, ignore_index, reduction, label_smoothing, compute_grad=False):
    """Argument checks of the kernel ops (the public functions check more, and earlier), so that a direct call with
    bad arguments is an error, never an out-of-bounds access. Target values: on a GPU an asynchronous device
    assert (no host wait), elsewhere a ValueError."""
    if logits.dim() != 2 or not logits.is_floating_point():
        _fail(ValueError, f"logits must be a 2-D floating tensor [N, C], got {logits.dtype} {list(logits.shape)}")
    N, C = logits.shape
    if target.shape != (N,) or target.dtype != torch.int64 or target.device != logits.device:
        _fail(ValueError, f"target must be an int64 tensor of shape [{N}] on {logits.device}, got {target.dtype} "
                          f"{list(target.shape)} on {target.device}")
    ad = acc_dtype(logits.dtype)
    for t, name in ((bias, "bias"), (weight, "weight")):
        if t is not None:
            _check_vector(t, name, C, ad, logits.device)
    if reduction not in (0, 1, 2):
        _fail(ValueError, f"reduction must be 0, 1 or 2, got {reduction}")
    if N:
        ok = ((target >= 0) & (target < C)) | (target == ignore_index)
        if logits.is_cuda:
            torch._assert_async(ok.all(), "fastml::logit_adjusted_ce: target out of range [0, C)")
        elif not bool(ok.all()):
            raise IndexError(f"fastml::logit_adjusted_ce: target must be in [0, {C}) or ignore_index")


def _check_bwd(grad_output, logits, target, bias, weight, lse, ignore_index, reduction, label_smoothing):
    _check_fwd(logits, target, bias, weight, ignore_index, reduction, label_smoothing)
    N = logits.shape[0]
    ad = acc_dtype(logits.dtype)
    _check_vector(lse, "lse", N, ad, logits.device)
    want = (N,) if reduction == 0 else ()
    if grad_output.shape != want or grad_output.device != logits.device:
        _fail(ValueError, f"grad_output must have shape {list(want)} on {logits.device}, got "
                          f"{list(grad_output.shape)} on {grad_output.device}")


def _fwd(logits, target, bias, weight, ignore_index, reduction, label_smoothing, compute_grad):
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == 0 else ())
    lse = logits.new_empty((N,), dtype=acc_dtype(logits.dtype))
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, lse, grad


def _bwd(grad_output, logits, target, bias, weight, lse, ignore_index, reduction, label_smoothing):
    return logits.new_empty(logits.shape)


FWD = OpSchema("logit_adjusted_ce_fwd",
               "(Tensor logits, Tensor target, Tensor? bias, Tensor? weight, int ignore_index, int reduction, "
               "float label_smoothing, bool compute_grad) -> (Tensor, Tensor, Tensor)", _fwd, check=_check_fwd)
BWD = OpSchema("logit_adjusted_ce_bwd",
               "(Tensor grad_output, Tensor logits, Tensor target, Tensor? bias, Tensor? weight, Tensor lse, "
               "int ignore_index, int reduction, float label_smoothing) -> Tensor", _bwd, check=_check_bwd)
declare(FWD, BWD)

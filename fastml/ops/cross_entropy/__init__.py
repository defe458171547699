"""Logit-adjusted cross-entropy (Menon et al., "Long-tail learning via logit adjustment"): public functions,
validation, autograd and the chunked linear head.

Backends: `reference` (reference.py), `cpp` (csrc/cpu/cross_entropy.cpp, the CPU kernels of the torch ops
fastml::logit_adjusted_ce_{fwd,bwd}) and `triton` (kernels/cross_entropy.py, behind the twins
fastml::logit_adjusted_ce_{fwd,bwd}_triton). The ops are declared in schema.py; the maths, the decisions and the
measurements are in README.md beside this file.
"""
from typing import Callable, NamedTuple

import torch

from fastml import _backend
from fastml._autograd import refuse_double_backward, scale_fused_grads
from fastml._args import floating_tensor, is_real, real
from fastml._numerics import acc_dtype
from fastml.ops.cross_entropy import reference, schema  # noqa: F401  (schema declares the kernel ops)
from fastml.ops.cross_entropy.reference import REDUCTIONS

OP = "logit_adjusted_cross_entropy"
LINEAR_OP = "linear_logit_adjusted_cross_entropy"
MEAN, SUM, NONE = REDUCTIONS["mean"], REDUCTIONS["sum"], REDUCTIONS["none"]


class _Impl(NamedTuple):
    """What a backend runs: `loss(logits, target, bias, weight, ignore_index, reduction_code, label_smoothing)`,
    differentiable in logits, and `chunk(...)`, the loss kernel the linear head runs on each chunk of rows:
    `chunk(logits, target, bias, weight, ignore_index, label_smoothing, compute_grad) -> (per-row losses,
    lse, d(sum of losses)/d logits or an empty tensor)`, and `chunk_grad(grad_rows, logits, target, bias, weight,
    lse, ignore_index, label_smoothing) -> grad_logits` for per-row output gradients."""

    loss: Callable
    chunk: Callable
    chunk_grad: Callable


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")


def _check_logits(logits, name="logits"):
    floating_tensor(logits, name)
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [N, C], got shape {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class (C >= 1), got shape {list(logits.shape)}")


def _check_class_vector(v, name, C, device, *, floating=True):
    """A [C] tensor (or a sequence of numbers) on `device`; returns it as a tensor."""
    if not isinstance(v, torch.Tensor):
        if isinstance(v, (list, tuple)) and all(is_real(x) for x in v):
            v = torch.tensor(v, dtype=torch.float64, device=device)
        else:
            raise TypeError(f"{name} must be a tensor of shape [C], got {type(v).__name__}")
    if floating and not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {v.dtype}")
    if v.dtype == torch.bool or v.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {v.dtype}")
    if v.dim() != 1 or v.shape[0] != C:
        raise ValueError(f"{name} must have shape [C] = [{C}], got {list(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the logits are on {device}")
    return v


def _eager():
    return not torch.compiler.is_compiling()


def _log_prior(log_prior, class_counts, C, device):
    """The log prior as a float64 tensor [C] (or None), from exactly one of log_prior / class_counts."""
    if log_prior is not None and class_counts is not None:
        raise ValueError("give log_prior or class_counts, not both")
    if log_prior is not None:
        lp = _check_class_vector(log_prior, "log_prior", C, device)
        if _eager() and not bool(torch.isfinite(lp).all()):
            raise ValueError("log_prior must be finite (every class needs a positive prior)")
        return lp.detach().double()
    if class_counts is not None:
        counts = _check_class_vector(class_counts, "class_counts", C, device, floating=False)
        counts = counts.detach().double()
        if _eager() and not bool(((counts > 0) & torch.isfinite(counts)).all()):
            raise ValueError("class_counts must be positive and finite")
        return counts.log() - counts.sum().log()
    return None


def _bias(logits, log_prior, class_counts, tau):
    """tau * log_prior in the accumulation dtype, or None (no prior, or tau = 0)."""
    C = logits.shape[1]
    lp = _log_prior(log_prior, class_counts, C, logits.device)
    tau = real(tau, "tau")
    if lp is None or tau == 0.0:
        return None
    return (tau * lp).to(acc_dtype(logits.dtype)).contiguous()


def _check_target(target, N, C, ignore_index, device, check_range=True):
    _check_tensor(target, "target")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class ids, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"target must have shape [N] = [{N}], got {list(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")
    if check_range and _eager() and N > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= C))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is out of range: class ids are in [0, {C}) or "
                             f"ignore_index ({ignore_index})")
    return target.long().contiguous()


def _check_options(ignore_index, reduction, label_smoothing):
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not is_real(label_smoothing):
        raise TypeError(f"label_smoothing must be a real number, got {type(label_smoothing).__name__}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return REDUCTIONS[reduction], label_smoothing


def _class_weight(weight, name, logits):
    if weight is None:
        return None
    w = _check_class_vector(weight, name, logits.shape[1], logits.device)
    return w.detach().to(acc_dtype(logits.dtype)).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def adjust_logits(logits, *, log_prior=None, class_counts=None, tau=1.0):
    """logits - tau * log_prior: post-hoc logit adjustment of a plainly trained model's logits.

    logits [N, C] floating; log_prior [C] (finite log class priors; any additive constant) or class_counts [C]
    (positive; prior = counts / sum), not both. Returns a new tensor in the logits' dtype (computed in float32 for
    half types), differentiable in logits; with neither prior, or tau = 0, a copy of logits.
    """
    _check_logits(logits)
    bias = _bias(logits, log_prior, class_counts, tau)
    if bias is None:
        return logits.clone()
    return (logits.to(bias.dtype) - bias).to(logits.dtype)


def logit_adjusted_cross_entropy(logits, target, *, log_prior=None, class_counts=None, tau=1.0, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto"):
    """Cross-entropy on the adjusted logits logits + tau * log_prior, fused.

    Equals F.cross_entropy(logits + tau * log_prior, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...) in value and gradient, with PyTorch's conventions ("mean" divides by the sum of the
    targets' weights; a batch with every row ignored gives NaN for "mean").

    logits [N, C] (float32, float64, float16, bfloat16; half types computed in float32); target [N] integer class
    ids in [0, C) or ignore_index; log_prior [C] or class_counts [C] (not both; neither, or tau = 0: plain
    cross-entropy); weight [C] class weights. -inf logits (masked classes) are allowed where the target's logit is
    finite. reduction "none" returns [N]. Nothing is differentiated through the prior or the weights.
    """
    _check_logits(logits)
    N, C = logits.shape
    code, label_smoothing = _check_options(ignore_index, reduction, label_smoothing)
    chosen = _backend.select(OP, _backend.Call(logits.device, logits.dtype), backend)
    # The C++ kernel checks the targets itself, in the pass that sums their weights: a second pass here would cost
    # as much as the loss when C is small. Its error is re-raised as the ValueError the other backends raise.
    in_kernel = chosen.kind == "cpp"
    target = _check_target(target, N, C, ignore_index, logits.device, check_range=not in_kernel)
    bias = _bias(logits, log_prior, class_counts, tau)
    w = _class_weight(weight, "weight", logits)
    if not in_kernel or not _eager():
        return chosen.impl.loss(logits, target, bias, w, ignore_index, code, label_smoothing)
    try:
        return chosen.impl.loss(logits, target, bias, w, ignore_index, code, label_smoothing)
    except RuntimeError as exc:
        if "is out of range: class ids are in" not in str(exc):
            raise
        raise ValueError(str(exc).splitlines()[0]) from None


def _default_chunk_size(N, C, D):
    """Rows per chunk of the linear head: the largest power of two whose chunk of logits [rows, C] is no larger
    than the hidden states [N, D] (so the head's working memory stays of the order of its inputs), at least 16."""
    rows = max(1, (N * D) // C)
    return 1 << max(4, rows.bit_length() - 1)


def linear_logit_adjusted_cross_entropy(hidden, weight, target, bias=None, *, log_prior=None, class_counts=None,
                                        tau=1.0, class_weight=None, ignore_index=-100, reduction="mean",
                                        label_smoothing=0.0, chunk_size=None, backend="auto"):
    """logit_adjusted_cross_entropy(hidden @ weight.T + bias, target, ...) without the [N, C] logits.

    hidden [N, D]; weight [C, D] (as nn.Linear's); bias [C] or None; class_weight [C] (the loss's class weights).
    Rows go through in chunks of `chunk_size` (default: chosen from N, C and D): each chunk's logits are computed,
    the loss kernel turns them into the chunk's losses and logit gradients, and those give the chunk's share of
    the gradients of hidden, weight and bias. Peak memory is one chunk of logits, never [N, C]. Gradients reach
    hidden, weight and bias; every reduction, "none" included, takes any output gradient.
    """
    _check_logits(hidden, "hidden")
    _check_tensor(weight, "weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [C, D] with D = {hidden.shape[1]} (hidden's last dim), got shape "
                         f"{list(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class (C >= 1)")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"weight must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), got "
                        f"{weight.dtype} on {weight.device}")
    N, D = hidden.shape
    C = weight.shape[0]
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), got "
                            f"{bias.dtype} on {bias.device}")
        if bias.dim() != 1 or bias.shape[0] != C:
            raise ValueError(f"bias must have shape [C] = [{C}], got {list(bias.shape)}")
    if chunk_size is None:
        chunk_size = _default_chunk_size(N, C, D)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    code, label_smoothing = _check_options(ignore_index, reduction, label_smoothing)
    target = _check_target(target, N, C, ignore_index, hidden.device)
    # The prior and class weights are per class: shaped like the logits' columns.
    shape_ref = hidden.new_empty((0, C))
    log_bias = _bias(shape_ref, log_prior, class_counts, tau)
    cw = _class_weight(class_weight, "class_weight", shape_ref)
    chosen = _backend.select(LINEAR_OP, _backend.Call(hidden.device, hidden.dtype), backend)
    if chosen.kind == "reference":
        return reference.linear_logit_adjusted_cross_entropy(hidden, weight, target, bias, log_bias, cw,
                                                             ignore_index=ignore_index, reduction=reduction,
                                                             label_smoothing=label_smoothing)
    from fastml.ops.cross_entropy.linear import linear_head

    return linear_head(chosen.impl, hidden, weight, target, bias, log_bias, cw, ignore_index, code,
                       label_smoothing, min(chunk_size, max(N, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _kernel_impl(fwd, bwd):
    """The implementation of a kernel backend from its two torch ops.

    Forward of a reduced loss ("mean"/"sum") with a gradient to come: the kernel writes the gradient for an
    output gradient of 1 in the same pass (into a buffer of its own), and the backward scales that buffer in
    place by the output gradient (nothing to do for the usual 1). "none" (one output gradient per row, unknown
    in the forward) and a second backward through a retained graph recompute the gradient from the logits and
    the saved log-sum-exp instead, in one read of the logits. Under torch.compile the backward is functional:
    the saved buffer times the output gradient.
    """

    class _LossFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, bias, weight, ignore_index, reduction, label_smoothing):
            fuse = ctx.needs_input_grad[0] and reduction != NONE
            loss, lse, grad = fwd(logits, target, bias, weight, ignore_index, reduction, label_smoothing, fuse)
            compiling = torch.compiler.is_compiling()
            ctx.args = (ignore_index, reduction, label_smoothing)
            ctx.compiled = compiling and fuse
            if ctx.compiled:
                ctx.save_for_backward(logits, target, bias, weight, lse, grad)
            else:
                ctx.save_for_backward(logits, target, bias, weight, lse)
                ctx.buffer = grad if fuse else None
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            refuse_double_backward("cross-entropy kernels")
            ignore_index, reduction, label_smoothing = ctx.args
            if ctx.compiled:
                logits, target, bias, weight, lse, grad = ctx.saved_tensors
                return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None
            logits, target, bias, weight, lse = ctx.saved_tensors
            buffer, ctx.buffer = ctx.buffer, None  # released here: a retained graph's second backward recomputes
            if buffer is not None:
                buffer, = scale_fused_grads([buffer], grad_loss)
                return buffer, None, None, None, None, None, None
            g = grad_loss.to(acc_dtype(logits.dtype)).contiguous()
            grad = bwd(g, logits, target, bias, weight, lse, ignore_index, reduction, label_smoothing)
            return grad, None, None, None, None, None, None

    def loss(logits, target, bias, weight, ignore_index, reduction, label_smoothing):
        return _LossFn.apply(logits, target, bias, weight, ignore_index, reduction, label_smoothing)

    def chunk(logits, target, bias, weight, ignore_index, label_smoothing, compute_grad):
        return fwd(logits, target, bias, weight, ignore_index, NONE, label_smoothing, compute_grad)

    def chunk_grad(grad_rows, logits, target, bias, weight, lse, ignore_index, label_smoothing):
        return bwd(grad_rows, logits, target, bias, weight, lse, ignore_index, NONE, label_smoothing)

    return _Impl(loss, chunk, chunk_grad)


def _reference_loss(logits, target, bias, weight, ignore_index, reduction, label_smoothing):
    return reference.logit_adjusted_cross_entropy(logits, target, bias, weight, ignore_index=ignore_index,
                                                  reduction=reference.REDUCTION_NAMES[reduction],
                                                  label_smoothing=label_smoothing)


def _register():
    ops = torch.ops.fastml
    cpp = _kernel_impl(ops.logit_adjusted_ce_fwd, ops.logit_adjusted_ce_bwd)
    triton = _kernel_impl(ops.logit_adjusted_ce_fwd_triton, ops.logit_adjusted_ce_bwd_triton)
    ref = _Impl(_reference_loss, None, None)
    for op in (OP, LINEAR_OP):
        _backend.register(op, _backend.Backend("reference", ref))
        _backend.register(op, _backend.Backend("cpp", cpp))
        _backend.register(op, _backend.Backend("triton", triton))


_register()

__all__ = ["adjust_logits", "linear_logit_adjusted_cross_entropy", "logit_adjusted_cross_entropy"]

"""Plain-PyTorch definition of logit-adjusted cross-entropy: the truth the kernels are checked against.

The loss is PyTorch's cross-entropy on the adjusted logits z = logits + bias, where bias = tau * log_prior (a
vector over the classes). Everything is computed in the accumulation dtype (float32 for float32 and half inputs,
float64 for float64), and the result is returned in the logits' dtype, as the kernels do.
"""
import torch.nn.functional as F

from fastml._numerics import acc_dtype

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {v: k for k, v in REDUCTIONS.items()}


def logit_adjusted_cross_entropy(logits, target, bias=None, weight=None, *, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0):
    """F.cross_entropy(logits + bias, target, weight, ...) computed in the accumulation dtype.

    logits [N, C]; target [N] integer; bias [C] or None (tau * log_prior, already scaled); weight [C] or None."""
    dt = acc_dtype(logits.dtype)
    z = logits.to(dt)
    if bias is not None:
        z = z + bias.to(dt)
    loss = F.cross_entropy(z, target.long(), weight=None if weight is None else weight.to(dt),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss.to(logits.dtype)


def linear_logit_adjusted_cross_entropy(hidden, weight, target, bias=None, log_bias=None, class_weight=None, *,
                                        ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """The unfused linear head: logit_adjusted_cross_entropy on hidden @ weight.T + bias (all [N, C] logits at
    once). log_bias is tau * log_prior."""
    logits = F.linear(hidden, weight, bias)
    return logit_adjusted_cross_entropy(logits, target, log_bias, class_weight, ignore_index=ignore_index,
                                        reduction=reduction, label_smoothing=label_smoothing)

"""Loss modules over fastml's logit-adjusted cross-entropy (plain cross-entropy without a prior)."""
import torch
from torch import nn

from fastml._args import real
from fastml.ops.cross_entropy import (
    _check_options,
    _log_prior,
    linear_logit_adjusted_cross_entropy,
    logit_adjusted_cross_entropy,
)


def _class_vector(v, name):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v, dtype=torch.float64)
    if v.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [C], got shape {list(v.shape)}")
    return v.detach()


class _Options(nn.Module):
    """The prior (kept as a float64 log prior buffer, so .to(device) moves it), tau, the class weights and the
    reduction options shared by both losses."""

    def __init__(self, log_prior, class_counts, tau, weight, weight_name, ignore_index, reduction, label_smoothing):
        super().__init__()
        _check_options(ignore_index, reduction, label_smoothing)
        self.tau = real(tau, "tau")
        if log_prior is not None and class_counts is not None:
            raise ValueError("give log_prior or class_counts, not both")
        lp = None
        if log_prior is not None:
            v = _class_vector(log_prior, "log_prior")
            lp = _log_prior(v, None, v.shape[0], v.device)
        elif class_counts is not None:
            v = _class_vector(class_counts, "class_counts")
            lp = _log_prior(None, v, v.shape[0], v.device)
        self.register_buffer("log_prior", lp)
        w = _class_vector(weight, weight_name)
        if w is not None and not w.is_floating_point():
            raise TypeError(f"{weight_name} must be a floating tensor, got dtype {w.dtype}")
        self.register_buffer("class_weight", w)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)

    def _kwargs(self):
        return dict(log_prior=self.log_prior, tau=self.tau, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing)

    def extra_repr(self):
        C = None if self.log_prior is None else self.log_prior.shape[0]
        return (f"classes={C}, tau={self.tau}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")


class LogitAdjustedCrossEntropyLoss(_Options):
    """Cross-entropy on logits + tau * log_prior (fastml.logit_adjusted_cross_entropy) as a module.

    log_prior [C] or class_counts [C] (not both; neither: plain cross-entropy), weight [C] class weights; they are
    buffers, moved by .to(). forward(logits [N, C], target [N]) -> the loss.
    """

    def __init__(self, *, log_prior=None, class_counts=None, tau=1.0, weight=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0):
        super().__init__(log_prior, class_counts, tau, weight, "weight", ignore_index, reduction, label_smoothing)

    @property
    def weight(self):
        return self.class_weight

    def forward(self, logits, target):
        return logit_adjusted_cross_entropy(logits, target, weight=self.class_weight, **self._kwargs())


class LinearLogitAdjustedCrossEntropyLoss(_Options):
    """The chunked linear head (fastml.linear_logit_adjusted_cross_entropy) as a module: the loss of
    hidden @ weight.T + bias without the [N, C] logits.

    Same keywords as LogitAdjustedCrossEntropyLoss, with class_weight for the class weights and chunk_size (rows
    per chunk; None picks one from N, C and D). forward(hidden [N, D], weight [C, D], target [N], bias=None).
    """

    def __init__(self, *, log_prior=None, class_counts=None, tau=1.0, class_weight=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, chunk_size=None):
        super().__init__(log_prior, class_counts, tau, class_weight, "class_weight", ignore_index, reduction,
                         label_smoothing)
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, target, bias=None):
        return linear_logit_adjusted_cross_entropy(hidden, weight, target, bias, class_weight=self.class_weight,
                                                   chunk_size=self.chunk_size, **self._kwargs())


__all__ = ["LinearLogitAdjustedCrossEntropyLoss", "LogitAdjustedCrossEntropyLoss"]

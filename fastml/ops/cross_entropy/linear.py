"""The chunked linear head: cross-entropy on hidden @ weight.T + bias without materializing the [N, C] logits.

For each chunk of rows: logits = hidden[chunk] @ weight.T + bias (torch's GEMM), the backend's loss kernel gives
the rows' losses, their log-sum-exp and d(sum of the chunk's losses) / d logits, and three GEMMs turn that into
the chunk's share of the gradients: grad_hidden[chunk] = dlogits @ weight, grad_weight += dlogits.T @ hidden[chunk],
grad_bias += dlogits summed over rows. A reduced loss ("mean", "sum") has a single output gradient, so all of this
is done in the forward and the backward only scales; "none" has one output gradient per row, which multiplies
each row's dlogits before they are summed into grad_weight, so its backward runs the chunks again (the logits are
recomputed, the saved log-sum-exp reused) with the per-row output gradients.
"""
import torch

from fastml._autograd import refuse_double_backward, scale_fused_grads
from fastml._numerics import acc_dtype
from fastml.ops.cross_entropy.reference import REDUCTIONS

MEAN, SUM, NONE = REDUCTIONS["mean"], REDUCTIONS["sum"], REDUCTIONS["none"]


def _chunk_logits(h, weight, bias):
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _mean_scale(target, class_weight, ignore_index, acc):
    """1 / (sum of the targets' weights over rows not ignored), as PyTorch's "mean" divides; 0 when every row is
    ignored (their gradients are zero, as PyTorch's)."""
    valid = target != ignore_index
    if class_weight is None:
        denom = valid.sum().to(acc)
    else:
        denom = (class_weight[torch.where(valid, target, 0)] * valid).sum()
    if not bool(valid.any()):
        return 0.0, denom
    return 1.0 / float(denom) if float(denom) != 0.0 else float("nan"), denom


class _Grads:
    """grad_hidden [N, D] (hidden's dtype), grad_weight [C, D] and grad_bias [C] (accumulated in the accumulation
    dtype, returned in the parameters' dtype), filled chunk by chunk from the chunks' logit gradients."""

    def __init__(self, hidden, weight, bias, needs):
        acc = acc_dtype(hidden.dtype)
        self.same = acc == hidden.dtype
        self.h = torch.empty_like(hidden) if needs[0] else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (bias is not None and needs[2]) \
            else None
        self.weight, self.bias = weight, bias

    def add(self, s, e, h, dlogits):
        if self.h is not None:
            torch.mm(dlogits, self.weight, out=self.h[s:e])
        if self.w is not None:
            if self.same:
                self.w.addmm_(dlogits.t(), h)
            else:
                self.w += torch.mm(dlogits.t(), h).to(self.w.dtype)
        if self.b is not None:
            self.b += dlogits.sum(0, dtype=self.b.dtype)

    def result(self, scale):
        out = []
        for g, like in ((self.h, None), (self.w, self.weight), (self.b, self.bias)):
            if g is None:
                out.append(None)
                continue
            if scale != 1.0:
                g.mul_(scale)
            out.append(g if like is None else g.to(like.dtype))
        return out


def _run_chunks(impl, hidden, weight, bias, target, log_bias, class_weight, ignore_index, eps, chunk, grads,
                grad_rows=None, lse=None):
    """Forward (grad_rows None): returns (per-row losses [N] in the accumulation dtype, lse [N]) and, with grads,
    adds every chunk's gradient of the summed loss. Backward (grad_rows [N]): adds the gradients of
    sum_i grad_rows[i] * loss_i, from the saved lse."""
    N = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    losses = None
    if grad_rows is None:
        losses = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h = hidden[s:e]
        logits = _chunk_logits(h, weight, bias)
        if grad_rows is None:
            loss, lse_c, dlogits = impl.chunk(logits, target[s:e], log_bias, class_weight, ignore_index, eps,
                                              grads is not None)
            losses[s:e] = loss
            lse[s:e] = lse_c
        else:
            dlogits = impl.chunk_grad(grad_rows[s:e], logits, target[s:e], log_bias, class_weight, lse[s:e],
                                      ignore_index, eps)
        del logits
        if grads is not None:
            grads.add(s, e, h, dlogits)
        del dlogits
    return losses, lse


class _LinearHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, log_bias, class_weight, impl, ignore_index, reduction, eps, chunk):
        needs = ctx.needs_input_grad[:3]
        fuse = any(needs) and reduction != NONE
        grads = _Grads(hidden, weight, bias, needs) if fuse else None
        losses, lse = _run_chunks(impl, hidden, weight, bias, target, log_bias, class_weight, ignore_index, eps,
                                  chunk, grads)
        acc = losses.dtype
        scale = 1.0
        if reduction == NONE:
            loss = losses.to(hidden.dtype)
        elif reduction == SUM:
            loss = losses.sum().to(hidden.dtype)
        else:
            scale, denom = _mean_scale(target, class_weight, ignore_index, acc)
            loss = (losses.sum() / denom).to(hidden.dtype)
        ctx.args = (impl, ignore_index, reduction, eps, chunk, scale)
        ctx.save_for_backward(hidden, weight, bias, target, log_bias, class_weight, lse)
        ctx.grads = grads.result(scale) if fuse else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward("linear cross-entropy head")
        impl, ignore_index, reduction, eps, chunk, scale = ctx.args
        hidden, weight, bias, target, log_bias, class_weight, lse = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # released here: a retained graph's second backward recomputes
        if grads is not None:
            grads = scale_fused_grads(grads, grad_loss)
        else:
            acc = lse.dtype
            if reduction == NONE:
                rows = grad_loss.to(acc)
            else:
                rows = (grad_loss.to(acc) * scale).expand(hidden.shape[0])
            acc_grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            _run_chunks(impl, hidden, weight, bias, target, log_bias, class_weight, ignore_index, eps, chunk,
                        acc_grads, grad_rows=rows.contiguous(), lse=lse)
            grads = acc_grads.result(1.0)
        return (*grads, None, None, None, None, None, None, None, None)


def linear_head(impl, hidden, weight, target, bias, log_bias, class_weight, ignore_index, reduction, eps, chunk):
    return _LinearHead.apply(hidden, weight, bias, target, log_bias, class_weight, impl, ignore_index, reduction,
                             eps, chunk)

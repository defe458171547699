"""Regularizers from the view that input noise is a gradient penalty in disguise: the fused softmax KL, virtual
adversarial training, the gradient penalty (by double backward or by finite differences) and the noise
consistency penalty.

Kernel-backed (backends `reference` in reference.py, `cpp` in csrc/cpu/regularizers.cpp, `triton` in
kernels/regularizers.py, behind the torch ops fastml::softmax_kl_{fwd,bwd} and their _triton twins):
`softmax_kl`. Composite PyTorch over any model (no backend choice; `vat_loss` uses `softmax_kl`):
`vat_loss`, `gradient_penalty_backward`, `noise_consistency`. The maths and decisions are in README.md beside
this file.
"""
import contextlib
from typing import Callable, NamedTuple

import torch

from fastml import _backend
from fastml._autograd import refuse_double_backward, scale_fused_grads
from fastml._args import floating_tensor, real
from fastml._numerics import acc_dtype
from fastml.ops.regularizers import reference, schema  # noqa: F401  (schema declares the kernel ops)

OP = "softmax_kl"
REDUCTIONS = ("none", "sum", "batchmean")
MODES = ("finite_difference", "double_backward")


class _Impl(NamedTuple):
    """What a backend runs: `rows(p, q, temperature, grad_scale) -> kl [N]` (accumulation dtype), differentiable
    in p and q; grad_scale is the factor the caller applies to the sum of the rows (1 for "sum", 1 / N for
    "batchmean", None for "none"), which lets a kernel write the gradient in the forward."""

    rows: Callable


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _count(x, name, minimum=1):
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")
    return x


def _check_model(model):
    if not callable(model):
        raise TypeError(f"model must be callable (e.g. an nn.Module), got {type(model).__name__}")


def _check_x(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in schema.FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {list(x.shape)}")


def _check_generator(generator, device):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {device}")


# ---------------------------------------------------------------------------------------------------------------
# softmax_kl


def softmax_kl(p_logits, q_logits, *, reduction="batchmean", temperature=1.0, backend="auto"):
    """KL(softmax(p / T) || softmax(q / T)) over the last dim of [N, C] logits, fused: no probability tensor is
    materialized; one read of each row gives both log-sum-exps and the expectation, and the gradients come from the
    same sweep. Gradients reach both inputs (detach p_logits for a fixed target distribution).

    reduction: "none" ([N]), "sum", or "batchmean" (sum / N); the result is in float32 for half inputs (float64 for
    float64). The temperature divides the logits; the KL is not rescaled by T^2. Classes to which p gives zero
    probability (a -inf logit) add nothing, even where q's logit is -inf too.
    """
    for t, name in ((p_logits, "p_logits"), (q_logits, "q_logits")):
        floating_tensor(t, name)
        if t.dim() != 2:
            raise ValueError(f"{name} must be [N, C], got shape {list(t.shape)}")
    if q_logits.shape != p_logits.shape:
        raise ValueError(f"q_logits must have p_logits' shape {list(p_logits.shape)}, got {list(q_logits.shape)}")
    if q_logits.dtype != p_logits.dtype or q_logits.device != p_logits.device:
        raise TypeError(f"q_logits must have p_logits' dtype and device ({p_logits.dtype}, {p_logits.device}), got "
                        f"{q_logits.dtype} on {q_logits.device}")
    if p_logits.shape[1] < 1:
        raise ValueError("the logits must have at least one class (C >= 1)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = real(temperature, "temperature", positive=True)
    N = p_logits.shape[0]
    impl = _backend.select(OP, _backend.Call(p_logits.device, p_logits.dtype), backend).impl
    scale = None if reduction == "none" else (1.0 if reduction == "sum" else 1.0 / max(N, 1))
    rows = impl.rows(p_logits.contiguous(), q_logits.contiguous(), temperature, scale)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / N


def _kernel_impl(fwd, bwd):
    """The autograd.Function of a kernel backend. For a reduced loss whose gradient is wanted, the forward kernel
    writes the gradients for an output gradient of 1 in the same sweep, and the backward scales them by the actual
    output gradient (nothing to do for the usual 1). Otherwise ("none", or a retained graph's second backward) the
    backward recomputes them from the logits and the saved per-row statistics in one more read."""

    class _RowsFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p, q, temperature, scale):
            fuse = scale is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            kl, stats, dp, dq = fwd(p, q, temperature, 1.0 if scale is None else scale, fuse)
            ctx.temperature, ctx.scale = temperature, scale
            ctx.compiled = torch.compiler.is_compiling() and fuse
            if ctx.compiled:
                ctx.save_for_backward(p, q, stats, dp, dq)
            else:
                ctx.save_for_backward(p, q, stats)
                ctx.buffers = (dp, dq) if fuse else None
            return kl

        @staticmethod
        def backward(ctx, g):
            refuse_double_backward("softmax_kl kernels")
            if ctx.compiled:
                p, q, stats, dp, dq = ctx.saved_tensors
                s = (g[0] / ctx.scale).to(dp.dtype)
                return dp * s, dq * s, None, None
            p, q, stats = ctx.saved_tensors
            buffers, ctx.buffers = ctx.buffers, None
            if buffers is not None:
                # The reduced loss is scale * sum(rows): every row's output gradient is the same, g[0] / scale.
                s = g[0] / ctx.scale
                dp, dq = scale_fused_grads(buffers, s)
                return dp, dq, None, None
            dp, dq = bwd(g.to(stats.dtype).contiguous(), p, q, stats, ctx.temperature)
            return dp, dq, None, None

    def rows(p, q, temperature, scale):
        return _RowsFn.apply(p, q, temperature, scale)

    return _Impl(rows)


def _reference_rows(p, q, temperature, scale):
    return reference.softmax_kl_rows(p, q, temperature)


# ---------------------------------------------------------------------------------------------------------------
# VAT


@contextlib.contextmanager
def _frozen_norm_statistics(model):
    """Running statistics of the model's batch-norm (and instance-norm) layers are swapped for copies while the
    block runs and put back after, so forward passes inside it change nothing the model keeps. The originals are
    restored by attribute, never written in place, so graphs recorded inside the block stay valid."""
    saved = []
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    for m in modules:
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            originals = {k: m._buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked")
                         if m._buffers.get(k) is not None}
            saved.append((m, originals))
            for k, t in originals.items():
                m._buffers[k] = t.clone()
    try:
        yield
    finally:
        for m, originals in saved:
            for k, t in originals.items():
                m._buffers[k] = t


def _per_example_normalize(d):
    flat = d.reshape(d.shape[0], -1)
    norm = flat.norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
    return (flat / norm[:, None]).reshape(d.shape)


def _logits_2d(out, name="model output"):
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the {name} must be logits [N, C], got "
                         f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


def _vat_direction(model, x, p_logits, xi, n_power_iterations, generator):
    """The adversarial direction (unit norm per example): power iteration on the Hessian of
    KL(p(x) || p(x + r)) at r = 0, each step d <- grad_r KL at r = xi * d, normalized."""
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    d = _per_example_normalize(d)
    for _ in range(n_power_iterations):
        d = d.detach().requires_grad_(True)
        q = _logits_2d(model(x.detach() + xi * d))
        dist = softmax_kl(p_logits, q.to(p_logits.dtype), reduction="batchmean")
        (grad,) = torch.autograd.grad(dist, d)  # gradients of d only: the parameters' .grad are left alone
        d = _per_example_normalize(grad.detach())
    return d.detach()


def vat_loss(model, x, *, logits=None, xi=1e-6, eps=1.0, n_power_iterations=1, generator=None):
    """Virtual adversarial training's loss (Miyato et al.): KL(p(x) || p(x + r_adv)) averaged over the batch, with
    p(x) = softmax(model(x)) held fixed and r_adv = eps * d / ||d|| per example, d the direction in which the KL
    grows fastest near r = 0, found by power iteration on the KL's Hessian started from a Gaussian direction
    (`generator` draws it) and evaluated at r = xi * d.

    model maps x [N, ...] to logits [N, C]; logits: the model's logits at x, if the caller already has them (they
    are detached; the model is then not run at x). Differentiable in the model's parameters through the final
    forward pass only: the power iteration differentiates with respect to d alone, so it never leaves gradients in
    the parameters, and the running statistics of batch-norm layers are the same after the call as before.
    Composite PyTorch over softmax_kl.
    """
    _check_model(model)
    _check_x(x)
    xi = real(xi, "xi", positive=True)
    eps = real(eps, "eps", positive=True)
    n_power_iterations = _count(n_power_iterations, "n_power_iterations", 0)
    _check_generator(generator, x.device)
    with _frozen_norm_statistics(model):
        if logits is None:
            with torch.no_grad():
                logits = _logits_2d(model(x))
        else:
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"logits must be a tensor or None, got {type(logits).__name__}")
            _logits_2d(logits, "logits")
            if logits.shape[0] != x.shape[0]:
                raise ValueError(f"logits must have x's batch size {x.shape[0]}, got {list(logits.shape)}")
        p = logits.detach()
        d = _vat_direction(model, x, p, xi, n_power_iterations, generator)
        q = _logits_2d(model(x.detach() + eps * d))
        if q.shape != p.shape:
            raise ValueError(f"the model's logits at x + r {list(q.shape)} differ from logits {list(p.shape)}")
        return softmax_kl(p, q.to(p.dtype), reduction="batchmean")


# ---------------------------------------------------------------------------------------------------------------
# Gradient penalty


def _as_inputs(inputs):
    """(tuple of tensors, rebuild(tuple) -> what loss_fn takes)."""
    if isinstance(inputs, torch.Tensor):
        _check_x(inputs, "inputs")
        return (inputs,), lambda xs: xs[0]
    if isinstance(inputs, (list, tuple)) and inputs:
        for i, t in enumerate(inputs):
            _check_x(t, f"inputs[{i}]")
        kind = type(inputs)
        return tuple(inputs), lambda xs: kind(xs)
    raise TypeError(f"inputs must be a floating tensor or a non-empty list/tuple of them, got "
                    f"{type(inputs).__name__}")


def _scalar_loss(loss):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's result does not require grad: it depends on no parameter or input")
    return loss.reshape(())


def _leaves(loss, exclude):
    """The leaf tensors the loss's graph accumulates gradients into (what loss.backward() would fill), found by
    walking grad_fn.next_functions; `exclude` (the detached inputs) are left out."""
    seen, out, stack = set(), [], [loss.grad_fn]
    skip = {id(t) for t in exclude}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and type(fn).__name__ == "AccumulateGrad":
            if id(var) not in skip:
                out.append(var)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return out


def _accumulate(params, grads):
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


def gradient_penalty_backward(loss_fn, inputs, *, weight, mode="finite_difference", h=1e-2):
    """Accumulates into the parameters' .grad the gradient of L + weight / 2 * ||dL/dx||^2, where
    L = loss_fn(inputs) and x are the inputs (a tensor, or a list/tuple of tensors passed to loss_fn as such).

    mode "double_backward" differentiates through the input gradient (create_graph=True); every op in loss_fn needs
    a double backward. mode "finite_difference" needs first-order gradients only: with g = dL/dx,
        grad L(x) + weight * ||g|| / h * (grad L(x + h g / ||g||) - grad L(x)),
    two forward and two backward passes, so it works with kernels that have no double backward; its error is O(h).
    "Parameters" are the leaf tensors requiring grad that L depends on (what L.backward() would fill); the inputs
    are detached first, so nothing is accumulated into them. Returns (L, ||dL/dx||^2 / 2), detached.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    xs, rebuild = _as_inputs(inputs)
    weight = real(weight, "weight")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    h = real(h, "h", positive=True)
    xs = tuple(x.detach().requires_grad_(True) for x in xs)
    if mode == "double_backward":
        loss = _scalar_loss(loss_fn(rebuild(xs)))
        gs = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
        sq = sum((g.to(acc_dtype(g.dtype)).pow(2).sum() for g in gs if g is not None), loss.new_zeros(()))
        penalty = 0.5 * sq
        params = _leaves(loss, xs)
        total = loss + weight * penalty.to(loss.dtype)
        grads = torch.autograd.grad(total, params, allow_unused=True) if params else ()
        _accumulate(params, grads)
        return loss.detach(), penalty.detach()
    loss = _scalar_loss(loss_fn(rebuild(xs)))
    params = _leaves(loss, xs)
    out = torch.autograd.grad(loss, list(xs) + params, allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, out[:len(xs)])]
    g1 = out[len(xs):]
    sq = sum(g.to(acc_dtype(g.dtype)).pow(2).sum() for g in gs)
    norm = float(sq.sqrt())
    c = weight * norm / h
    if c == 0.0 or not params:
        _accumulate(params, g1)
        return loss.detach(), (0.5 * sq).detach()
    with torch.no_grad():
        shifted = tuple(x + (h / norm) * g for x, g in zip(xs, gs))
    loss2 = _scalar_loss(loss_fn(rebuild(shifted)))
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    combined = []
    for a, b in zip(g1, g2):
        if a is None and b is None:
            combined.append(None)
        elif a is None:
            combined.append(c * b)
        elif b is None:
            combined.append((1.0 - c) * a)
        else:
            combined.append((1.0 - c) * a + c * b)
    _accumulate(params, combined)
    return loss.detach(), (0.5 * sq).detach()


# ---------------------------------------------------------------------------------------------------------------
# Noise consistency


def noise_consistency(model, x, *, sigma, n_samples=1, generator=None):
    """The label-free noise penalty E ||f(x + e) - f(x)||^2 with e ~ N(0, sigma^2): per example the squared
    distance summed over the output's non-batch dims, averaged over `n_samples` draws, then over the batch.
    Differentiable in the model's parameters through both f(x) and f(x + e) (to first order in sigma it is
    sigma^2 ||J||_F^2, the input-gradient penalty the noise stands for). Composite PyTorch.
    """
    _check_model(model)
    _check_x(x)
    sigma = real(sigma, "sigma", nonnegative=True)
    n_samples = _count(n_samples, "n_samples", 1)
    _check_generator(generator, x.device)
    f0 = model(x)
    if not isinstance(f0, torch.Tensor) or f0.dim() < 1 or f0.shape[0] != x.shape[0]:
        raise ValueError("the model must return a tensor with x's batch dimension first")
    total = None
    for _ in range(n_samples):
        e = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma
        diff = (model(x + e) - f0).reshape(x.shape[0], -1)
        per = diff.to(acc_dtype(diff.dtype)).pow(2).sum(dim=1)
        total = per if total is None else total + per
    return (total / n_samples).mean()


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register():
    ops = torch.ops.fastml
    _backend.register(OP, _backend.Backend("reference", _Impl(_reference_rows)))
    _backend.register(OP, _backend.Backend("cpp", _kernel_impl(ops.softmax_kl_fwd, ops.softmax_kl_bwd)))
    _backend.register(OP, _backend.Backend("triton", _kernel_impl(ops.softmax_kl_fwd_triton,
                                                                  ops.softmax_kl_bwd_triton)))


_register()

__all__ = ["gradient_penalty_backward", "noise_consistency", "softmax_kl", "vat_loss"]

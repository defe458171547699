"""Gaussian latent ops for VAEs and hierarchical VAEs (NVAE): the reparameterized sample and its KL, fused, plus
NVAE's training devices (KL warm-up, KL balancing, the spectral penalty).

Kernel-backed (backends `reference` in reference.py, `cpp` in csrc/cpu/gaussian.cpp, `triton` in
kernels/gaussian.py, behind the torch ops fastml::gaussian_kl_{fwd,bwd} and their _triton twins):
`gaussian_kl`, `gaussian_sample_kl`. Composite PyTorch (no backend choice): `kl_warmup`, `kl_balance`,
`spectral_penalty`, and `soft_clamp`. The maths and decisions are in README.md beside this file.
"""
from typing import Callable, NamedTuple

import torch

from fastml import _backend
from fastml._autograd import refuse_double_backward
from fastml._args import floating_tensor, is_real, real
from fastml._numerics import acc_dtype
from fastml._random import draw_seed
from fastml.ops.gaussian import reference, schema  # noqa: F401  (schema declares the kernel ops)

OP = "gaussian_kl"
REDUCTIONS = ("none", "per_sample", "sum", "batchmean")


class _Impl(NamedTuple):
    """What a backend runs: `run(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
    -> (z, kl)`, differentiable in the four tensors; z is an empty tensor when seed is None; kl is element-wise
    (mu's dtype) or per sample [B] (accumulation dtype)."""

    run: Callable


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_inputs(mu, logvar, prior_mu, prior_logvar, reduction):
    floating_tensor(mu, "mu")
    if mu.dim() < 1:
        raise ValueError("mu must have a batch dimension (at least 1-D), got a 0-d tensor")
    floating_tensor(logvar, "logvar")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {list(mu.shape)}, got {list(logvar.shape)}")
    if logvar.dtype != mu.dtype or logvar.device != mu.device:
        raise TypeError(f"logvar must have mu's dtype and device ({mu.dtype}, {mu.device}), got {logvar.dtype} on "
                        f"{logvar.device}")
    priors = []
    for t, name in ((prior_mu, "prior_mu"), (prior_logvar, "prior_logvar")):
        if t is not None:
            floating_tensor(t, name)
            if t.dtype != mu.dtype or t.device != mu.device:
                raise TypeError(f"{name} must have mu's dtype and device ({mu.dtype}, {mu.device}), got {t.dtype} on "
                                f"{t.device}")
            try:
                shape = torch.broadcast_shapes(t.shape, mu.shape)
            except RuntimeError:
                shape = None
            if shape != mu.shape:
                raise ValueError(f"{name} must broadcast to mu's shape {list(mu.shape)}, got {list(t.shape)}")
            t = t.expand(mu.shape)
        priors.append(t)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return priors


def _reduce(kl, reduction, batch):
    if reduction in ("none", "per_sample"):
        return kl
    total = kl.sum()
    return total if reduction == "sum" else total / batch


def _contig(t):
    return None if t is None else t.contiguous()


def soft_clamp(x, c):
    """NVAE's soft clamp c * tanh(x / c): close to x for |x| << c, never beyond +-c; differentiable. Computed in
    float32 for half inputs; returns x's dtype."""
    floating_tensor(x, "x")
    c = real(c, "soft_clamp", positive=True)
    acc = acc_dtype(x.dtype)
    return (c * torch.tanh(x.to(acc) / c)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, residual=False, reduction="per_sample",
                backend="auto"):
    """KL(q || p) of diagonal Gaussians, in one pass.

    q = N(mu, exp(logvar)) and p = N(prior_mu, exp(prior_logvar)), p = N(0, 1) where the prior is not given (either
    part may be given alone: a missing prior mean is 0, a missing log variance 0). residual=True: mu and logvar are
    the posterior's offset and log variance ratio against the prior, q = N(prior_mu + mu, exp(prior_logvar +
    logvar)), and KL = 0.5 * (mu^2 / var_p + exp(logvar) - 1 - logvar).

    mu, logvar [B, ...] (one floating dtype; half types computed in float32); the prior broadcasts to mu's shape.
    reduction: "none" (element-wise, mu's dtype), "per_sample" ([B], summed over all but the first dim), "sum" or
    "batchmean" (sum / B); reduced results are in float32 for half inputs (float64 for float64). Gradients reach
    every tensor argument.
    """
    prior_mu, prior_logvar = _check_inputs(mu, logvar, prior_mu, prior_logvar, reduction)
    residual = bool(residual)
    impl = _backend.select(OP, _backend.Call(mu.device, mu.dtype), backend).impl
    _, kl = impl.run(mu.contiguous(), logvar.contiguous(), _contig(prior_mu), _contig(prior_logvar), None,
                     residual, 1.0, reduction == "none")
    return _reduce(kl, reduction, mu.shape[0])


def gaussian_sample_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, residual=False, temperature=1.0,
                       soft_clamp=None, generator=None, reduction="per_sample", backend="auto"):
    """The reparameterized sample and its KL in one pass: returns (z, KL).

    z = mean_q + temperature * std_q * e with e ~ N(0, 1) (mean_q = mu, std_q = exp(logvar / 2); residual: mean_q
    = prior_mu + mu, std_q = exp((prior_logvar + logvar) / 2)), z in mu's dtype; the KL as `gaussian_kl` (the
    temperature scales the sample, not the KL). The noise is drawn from a counter-based generator keyed by a seed
    taken from `generator` (torch's default generator when None), so the same generator state gives the same z on
    every backend, and the kernel backends regenerate e in the backward instead of storing it: they save only the
    inputs and the seed. soft_clamp=c first maps mu and logvar through c * tanh(x / c) (a composite torch step,
    whose tanh is saved for the backward).
    """
    prior_mu, prior_logvar = _check_inputs(mu, logvar, prior_mu, prior_logvar, reduction)
    temperature = real(temperature, "temperature", nonnegative=True)
    if soft_clamp is not None:
        c = real(soft_clamp, "soft_clamp", positive=True)
        acc = acc_dtype(mu.dtype)
        mu = (c * torch.tanh(mu.to(acc) / c)).to(mu.dtype)
        logvar = (c * torch.tanh(logvar.to(acc) / c)).to(logvar.dtype)
    if mu.numel() > reference.MAX_ELEMENTS:
        raise ValueError(f"mu has {mu.numel()} elements; the noise counter is 32 bits wide (at most 2^32)")
    seed = draw_seed(generator, mu.device, "mu")
    impl = _backend.select(OP, _backend.Call(mu.device, mu.dtype), backend).impl
    z, kl = impl.run(mu.contiguous(), logvar.contiguous(), _contig(prior_mu), _contig(prior_logvar), seed,
                     bool(residual), temperature, reduction == "none")
    return z, _reduce(kl, reduction, mu.shape[0])


def kl_warmup(step, *, warmup_steps, constant_steps=0, min_coeff=1e-4):
    """NVAE's KL warm-up coefficient: min_coeff for the first `constant_steps` steps, then a linear ramp that
    reaches 1 after `warmup_steps` more, never below min_coeff: max(min((step - constant_steps) / warmup_steps, 1),
    min_coeff)."""
    step = real(step, "step", nonnegative=True)
    warmup_steps = real(warmup_steps, "warmup_steps", positive=True)
    constant_steps = real(constant_steps, "constant_steps", nonnegative=True)
    min_coeff = real(min_coeff, "min_coeff", nonnegative=True)
    if min_coeff > 1:
        raise ValueError(f"min_coeff must be in [0, 1], got {min_coeff}")
    return max(min((step - constant_steps) / warmup_steps, 1.0), min_coeff)


def kl_balance(kl_groups, *, kl_coeff, alpha=None):
    """NVAE's KL balancing across G latent groups: returns (balanced KL per sample [B], coefficients [G]).

    kl_groups: [G, B] or a list of G tensors [B] (each group's KL per sample). While kl_coeff < 1 (warm-up), each
    group's coefficient is proportional to (mean over the batch of |KL_g| + 0.01) / alpha_g and the coefficients
    are normalized to mean 1 and detached, so groups with a large KL are pushed harder; from kl_coeff = 1 on they
    are all 1. The result is kl_coeff * sum_g coeff_g * KL_g. alpha: [G] positive weights (None: all 1), e.g.
    proportional to a group's spatial size.
    """
    if isinstance(kl_groups, (list, tuple)):
        if not kl_groups:
            raise ValueError("kl_groups must hold at least one group")
        for i, t in enumerate(kl_groups):
            floating_tensor(t, f"kl_groups[{i}]")
            if t.shape != kl_groups[0].shape or t.dim() != 1:
                raise ValueError(f"kl_groups[{i}] must be [B] like kl_groups[0] {list(kl_groups[0].shape)}, got "
                                 f"{list(t.shape)}")
            if t.dtype != kl_groups[0].dtype or t.device != kl_groups[0].device:
                raise TypeError(f"kl_groups[{i}] must have kl_groups[0]'s dtype and device")
        kl = torch.stack(list(kl_groups))
    else:
        floating_tensor(kl_groups, "kl_groups")
        if kl_groups.dim() != 2 or kl_groups.shape[0] < 1:
            raise ValueError(f"kl_groups must be [G, B] with G >= 1, got {list(kl_groups.shape)}")
        kl = kl_groups
    G = kl.shape[0]
    kl_coeff = real(kl_coeff, "kl_coeff", nonnegative=True)
    if alpha is None:
        a = torch.ones(G, dtype=kl.dtype, device=kl.device)
    else:
        if not isinstance(alpha, torch.Tensor):
            if isinstance(alpha, (list, tuple)) and all(is_real(x) for x in alpha):
                alpha = torch.tensor(alpha, dtype=kl.dtype, device=kl.device)
            else:
                raise TypeError(f"alpha must be a tensor [G] or None, got {type(alpha).__name__}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating tensor, got dtype {alpha.dtype}")
        if alpha.shape != (G,):
            raise ValueError(f"alpha must have shape [G] = [{G}], got {list(alpha.shape)}")
        if not bool((alpha > 0).all()):
            raise ValueError("alpha must be positive")
        a = alpha.detach().to(device=kl.device, dtype=kl.dtype)
    if kl_coeff < 1.0:
        c = (kl.detach().abs().mean(dim=1) + 0.01) / a
        coeff = (c / c.mean()).detach()
    else:
        coeff = torch.ones(G, dtype=kl.dtype, device=kl.device)
    return kl_coeff * (coeff[:, None] * kl).sum(dim=0), coeff


def _as_weights(weights):
    if isinstance(weights, torch.Tensor):
        return [weights]
    if isinstance(weights, torch.nn.Parameter):
        return [weights]
    try:
        out = list(weights)
    except TypeError:
        raise TypeError(f"weights must be a tensor or an iterable of tensors, got {type(weights).__name__}") from None
    if not out:
        raise ValueError("weights must hold at least one tensor")
    return out


def _normalize(x):
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


def spectral_penalty(weights, *, n_power_iterations=1, state=None):
    """Sum of the largest singular values of `weights` (a tensor or an iterable of tensors; a weight of more than
    two dims, e.g. a conv kernel [out, in, kh, kw], is taken as the matrix [out, in * kh * kw]), as NVAE's spectral
    regularizer. Each sigma is estimated by power iteration whose vectors (u, v) persist in `state` between calls,
    so one iteration per training step suffices once warm; sigma = u^T W v with u, v held constant, so its gradient
    is u v^T. Returns (penalty, new state); the state passed in is not modified.
    """
    ws = _as_weights(weights)
    if not isinstance(n_power_iterations, int) or isinstance(n_power_iterations, bool) or n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict returned by spectral_penalty or None, got {type(state).__name__}")
    new_state, total = {}, None
    for i, w in enumerate(ws):
        floating_tensor(w, f"weights[{i}]")
        if w.dim() < 2:
            raise ValueError(f"weights[{i}] must have at least 2 dims, got shape {list(w.shape)}")
        W = w.reshape(w.shape[0], -1)
        acc = acc_dtype(w.dtype)
        with torch.no_grad():
            Wd = W.detach().to(acc)
            if state is not None and i in state:
                u, v = state[i]
                if u.shape != (W.shape[0],) or v.shape != (W.shape[1],):
                    raise ValueError(f"state[{i}] holds vectors for a {u.shape[0]} x {v.shape[0]} matrix, but "
                                     f"weights[{i}] is {W.shape[0]} x {W.shape[1]}")
                u, v = u.to(Wd), v.to(Wd)
            else:
                g = torch.Generator().manual_seed(i)
                u = _normalize(torch.randn(W.shape[0], generator=g, dtype=torch.float64)).to(Wd)
                v = _normalize(torch.randn(W.shape[1], generator=g, dtype=torch.float64)).to(Wd)
            for _ in range(n_power_iterations):
                v = _normalize(Wd.t() @ u)
                u = _normalize(Wd @ v)
        sigma = u @ W.to(acc) @ v
        total = sigma if total is None else total + sigma
        new_state[i] = (u, v)
    return total, new_state


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _kernel_impl(fwd, bwd):
    """One autograd.Function over a kernel backend's two ops: the forward saves only its inputs and the seed, and
    the backward recomputes everything from them, noise included."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
            z, kl = fwd(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
            ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, seed)
            ctx.args = (residual, temperature, elementwise)
            ctx.set_materialize_grads(False)
            if seed is None:
                ctx.mark_non_differentiable(z)
            return z, kl

        @staticmethod
        def backward(ctx, gz, gkl):
            refuse_double_backward("Gaussian kernels")
            mu, logvar, prior_mu, prior_logvar, seed = ctx.saved_tensors
            residual, temperature, elementwise = ctx.args
            if gkl is None:
                gkl = (torch.zeros_like(mu) if elementwise
                       else mu.new_zeros((mu.shape[0],), dtype=acc_dtype(mu.dtype)))
            if seed is None or gz is None or gz.numel() == 0:
                gz = None
            else:
                gz = gz.to(mu.dtype).contiguous()
            dmu, dlv, dpm, dplv = bwd(gz, gkl.to(mu.dtype if elementwise else acc_dtype(mu.dtype)).contiguous(), mu,
                                      logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
            return (dmu, dlv, dpm if prior_mu is not None else None, dplv if prior_logvar is not None else None,
                    None, None, None, None)

    def run(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
        return _Fn.apply(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)

    return _Impl(run)


def _reference_run(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    red = "none" if elementwise else "per_sample"
    if seed is None:
        return mu.new_empty((0,)), reference.gaussian_kl(mu, logvar, prior_mu, prior_logvar, residual=residual,
                                                         reduction=red)
    return reference.gaussian_sample_kl(mu, logvar, prior_mu, prior_logvar, residual=residual,
                                        temperature=temperature, seed=seed, reduction=red)


def _register():
    ops = torch.ops.fastml
    _backend.register(OP, _backend.Backend("reference", _Impl(_reference_run)))
    _backend.register(OP, _backend.Backend("cpp", _kernel_impl(ops.gaussian_kl_fwd, ops.gaussian_kl_bwd)))
    _backend.register(OP, _backend.Backend("triton", _kernel_impl(ops.gaussian_kl_fwd_triton,
                                                                  ops.gaussian_kl_bwd_triton)))


_register()

__all__ = ["gaussian_kl", "gaussian_sample_kl", "kl_balance", "kl_warmup", "soft_clamp", "spectral_penalty"]

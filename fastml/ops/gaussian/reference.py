"""The definition of the Gaussian latent ops in plain PyTorch (exact in float64).

The noise of `gaussian_sample_kl` is counter-based: element i of the flattened latent gets a standard normal
value that depends only on i and a 64-bit key (the "seed"), never on the order in which elements are visited.
That is what lets the kernel backends regenerate it in the backward instead of storing it. The definition:

    mix(x)   = the 32-bit finalizer of fastml/_random.py
    bits(c)  = mix(mix(c ^ k0) + k1), with k0 / k1 the low / high 32 bits of the seed
    pair j   = elements 2j and 2j + 1: u1 = ((bits(2j) >> 8) + 1) / 2^24 in (0, 1],
               u2 = (bits(2j + 1) >> 8) / 2^24 in [0, 1), radius = sqrt(-2 log u1), angle = 2 pi u2,
               e[2j] = radius cos(angle), e[2j + 1] = radius sin(angle)          (Box-Muller)

This module computes it with int64 tensor arithmetic (products split so that none overflows), so the reference,
the C++ kernels and the Triton kernels all draw the same e for the same seed.
"""
import math

import torch

from fastml._numerics import acc_dtype
from fastml._random import MASK, mix, split_seed

MAX_ELEMENTS = 1 << 32  # the counter is 32 bits wide


def standard_normal(n, seed, dtype=torch.float64, device=None):
    """The counter-based noise e[0:n] (module docstring) for an int64 seed tensor [1], in `dtype`."""
    device = seed.device if device is None else device
    k0, k1 = split_seed(seed.to(device))
    pairs = (n + 1) // 2
    j = torch.arange(pairs, device=device, dtype=torch.int64)

    def bits(c):
        return mix((mix(c ^ k0) + k1) & MASK)

    u1 = ((bits(2 * j) >> 8) + 1).to(torch.float64) * 2.0**-24
    u2 = (bits(2 * j + 1) >> 8).to(torch.float64) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    e = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1).reshape(-1)[:n]
    return e.to(dtype)


def _prior(mu, prior_mu, prior_logvar):
    pm = torch.zeros_like(mu) if prior_mu is None else prior_mu.to(mu.dtype)
    plv = torch.zeros_like(mu) if prior_logvar is None else prior_logvar.to(mu.dtype)
    return pm, plv


def kl_elements(mu, logvar, prior_mu=None, prior_logvar=None, residual=False):
    """Element-wise KL(q || p) in the accumulation dtype (float32 for half inputs).

    Plain: q = N(mu, exp(logvar)), p = N(prior_mu, exp(prior_logvar)). Residual: q = N(prior_mu + mu,
    exp(prior_logvar + logvar)). Written with differences of log variances and exp(-prior_logvar), never a ratio
    of two exponentials, so that large log variances give inf where the exact value overflows, not NaN."""
    acc = acc_dtype(mu.dtype)
    mu, logvar = mu.to(acc), logvar.to(acc)
    pm, plv = _prior(mu, None if prior_mu is None else prior_mu.to(acc),
                     None if prior_logvar is None else prior_logvar.to(acc))
    d, r = (mu, logvar) if residual else (mu - pm, logvar - plv)
    return 0.5 * (d * d * torch.exp(-plv) + torch.exp(r) - 1.0 - r)


def reduce(kl, reduction):
    """kl [B, ...] elementwise (accumulation dtype) -> the reduction's result."""
    if reduction == "none":
        return kl
    per_sample = kl.reshape(kl.shape[0], -1).sum(dim=1)
    if reduction == "per_sample":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / kl.shape[0]  # batchmean


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, residual=False, reduction="per_sample"):
    kl = kl_elements(mu, logvar, prior_mu, prior_logvar, residual)
    if reduction == "none":
        return kl.to(mu.dtype)
    return reduce(kl, reduction)


def gaussian_sample_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, residual=False, temperature=1.0,
                       seed, reduction="per_sample"):
    """(z, KL) with z = mean_q + temperature * std_q * e, e the counter-based noise of `seed` (int64 [1])."""
    acc = acc_dtype(mu.dtype)
    e = standard_normal(mu.numel(), seed, acc, mu.device).reshape(mu.shape)
    mu_a, lv_a = mu.to(acc), logvar.to(acc)
    if residual:
        pm, plv = _prior(mu_a, None if prior_mu is None else prior_mu.to(acc),
                         None if prior_logvar is None else prior_logvar.to(acc))
        mean, lvq = pm + mu_a, plv + lv_a
    else:
        mean, lvq = mu_a, lv_a
    z = (mean + temperature * torch.exp(0.5 * lvq) * e).to(mu.dtype)
    return z, gaussian_kl(mu, logvar, prior_mu, prior_logvar, residual=residual, reduction=reduction)

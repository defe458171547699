"""Triton kernels of the Gaussian latent ops, the kernels of the torch ops fastml::gaussian_kl_fwd_triton and
fastml::gaussian_kl_bwd_triton (declared in fastml/ops/gaussian/schema.py).

A program owns BLOCK elements of one sample (grid: samples x chunks of the sample). It computes the KL, and with a
seed the sample, element-wise in float32 (float64 for float64 inputs), and writes either the element-wise KL or
its partial sum over the chunk, which the launcher adds per sample in a fixed order. The noise is the counter-based
one of fastml/ops/gaussian/reference.py: each element hashes its pair's counters with the seed's two 32-bit keys
and takes the cosine or sine half of the pair's Box-Muller transform, so the backward regenerates it exactly.
"""
import math

import torch
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import counter_mix, device_of

BLOCK = 1024


@triton.jit
def _noise(idx, seed, at):
    """e[idx] of the counter-based noise keyed by the int64 seed at `seed` (a pointer), in dtype `at`."""
    s = tl.load(seed)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((idx >> 1) * 2).to(tl.uint32)
    h1 = counter_mix(counter_mix(c1 ^ k0) + k1)
    h2 = counter_mix(counter_mix((c1 + 1) ^ k0) + k1)
    u1 = ((h1 >> 8) + 1).to(at) * (1.0 / 16777216.0)
    u2 = (h2 >> 8).to(at) * (1.0 / 16777216.0)
    radius = tl.sqrt(-2.0 * tl.log(u1))
    angle = 6.283185307179586 * u2
    return tl.where((idx & 1) == 0, radius * tl.cos(angle), radius * tl.sin(angle))


@triton.jit
def _load(ptr, idx, mask, at, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + idx, mask=mask, other=0.0).to(at)
    return tl.zeros(idx.shape, at)


@triton.jit
def _fwd_kernel(mu, lv, pm, plv, seed, consts, z, kl, partial, M, nch, HAS_PM: tl.constexpr, HAS_PLV: tl.constexpr,
                RES: tl.constexpr, SAMPLE: tl.constexpr, ELEM: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    idx = b.to(tl.int64) * M + offs
    at = partial.dtype.element_ty
    T = tl.load(consts)
    m = tl.load(mu + idx, mask=mask, other=0.0).to(at)
    lvar = tl.load(lv + idx, mask=mask, other=0.0).to(at)
    pmv = _load(pm, idx, mask, at, HAS_PM)
    plvv = _load(plv, idx, mask, at, HAS_PLV)
    if RES:
        d = m
        r = lvar
    else:
        d = m - pmv
        r = lvar - plvv
    klv = 0.5 * (d * d * tl.exp(-plvv) + tl.exp(r) - 1.0 - r)
    if SAMPLE:
        e = _noise(idx, seed, at)
        if RES:
            mean = pmv + m
            lvq = plvv + lvar
        else:
            mean = m
            lvq = lvar
        zv = mean + T * tl.exp(0.5 * lvq) * e
        tl.store(z + idx, zv.to(z.dtype.element_ty), mask=mask)
    if ELEM:
        tl.store(kl + idx, klv.to(kl.dtype.element_ty), mask=mask)
    else:
        tl.store(partial + b.to(tl.int64) * nch + c, tl.sum(tl.where(mask, klv, 0.0), axis=0))


@triton.jit
def _bwd_kernel(gz, gk, mu, lv, pm, plv, seed, consts, dmu, dlv, dpm, dplv, M, HAS_PM: tl.constexpr,
                HAS_PLV: tl.constexpr, RES: tl.constexpr, WITH_Z: tl.constexpr, ELEM: tl.constexpr,
                BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    idx = b.to(tl.int64) * M + offs
    at = consts.dtype.element_ty
    T = tl.load(consts)
    m = tl.load(mu + idx, mask=mask, other=0.0).to(at)
    lvar = tl.load(lv + idx, mask=mask, other=0.0).to(at)
    pmv = _load(pm, idx, mask, at, HAS_PM)
    plvv = _load(plv, idx, mask, at, HAS_PLV)
    if ELEM:
        g = tl.load(gk + idx, mask=mask, other=0.0).to(at)
    else:
        g = tl.zeros(idx.shape, at) + tl.load(gk + b).to(at)
    if RES:
        d = m
        r = lvar
        lvq = plvv + lvar
    else:
        d = m - pmv
        r = lvar - plvv
        lvq = lvar
    ip = tl.exp(-plvv)
    dd = d * ip
    dr = 0.5 * (tl.exp(r) - 1.0)
    if WITH_Z:
        gzv = tl.load(gz + idx, mask=mask, other=0.0).to(at)
        zs = gzv * 0.5 * T * tl.exp(0.5 * lvq) * _noise(idx, seed, at)
    else:
        gzv = tl.zeros(idx.shape, at)
        zs = tl.zeros(idx.shape, at)
    out_t = dmu.dtype.element_ty
    tl.store(dmu + idx, (g * dd + gzv).to(out_t), mask=mask)
    tl.store(dlv + idx, (g * dr + zs).to(out_t), mask=mask)
    if RES:
        gpm = gzv
        gplv = zs - g * 0.5 * d * dd
    else:
        gpm = -g * dd
        gplv = -g * dr - g * 0.5 * d * dd
    if HAS_PM:
        tl.store(dpm + idx, gpm.to(out_t), mask=mask)
    if HAS_PLV:
        tl.store(dplv + idx, gplv.to(out_t), mask=mask)


def _dummy(mu):
    return mu.new_empty((1,))


@implement("gaussian_kl_fwd", "triton")
def gaussian_kl_fwd_triton(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    from fastml.ops.gaussian.schema import FWD

    z, kl = FWD.fake(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
    B = mu.shape[0]
    M = mu.numel() // B if B > 0 else 0
    at = acc_dtype(mu.dtype)
    nch = max(1, math.ceil(M / BLOCK))
    partial = torch.zeros((max(B, 1), nch), dtype=at, device=mu.device)
    if B > 0 and M > 0:
        consts = torch.tensor([temperature], dtype=at, device=mu.device)
        seed_arg = seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=mu.device)
        with device_of(mu):
            _fwd_kernel[(B, nch)](mu, logvar, prior_mu if prior_mu is not None else _dummy(mu),
                                  prior_logvar if prior_logvar is not None else _dummy(mu), seed_arg, consts,
                                  z if seed is not None else _dummy(mu), kl, partial, M, nch,
                                  HAS_PM=prior_mu is not None, HAS_PLV=prior_logvar is not None, RES=bool(residual),
                                  SAMPLE=seed is not None, ELEM=bool(elementwise), BLOCK=BLOCK)
    if not elementwise:
        kl = partial[:B].sum(dim=1) if M > 0 else torch.zeros((B,), dtype=at, device=mu.device)
    return z, kl


@implement("gaussian_kl_bwd", "triton")
def gaussian_kl_bwd_triton(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature,
                           elementwise):
    from fastml.ops.gaussian.schema import BWD

    dmu, dlv, dpm, dplv = BWD.fake(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature,
                                   elementwise)
    B = mu.shape[0]
    M = mu.numel() // B if B > 0 else 0
    if B > 0 and M > 0:
        at = acc_dtype(mu.dtype)
        consts = torch.tensor([temperature], dtype=at, device=mu.device)
        seed_arg = seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=mu.device)
        with device_of(mu):
            _bwd_kernel[(B, math.ceil(M / BLOCK))](
                grad_z if grad_z is not None else _dummy(mu), grad_kl, mu, logvar,
                prior_mu if prior_mu is not None else _dummy(mu),
                prior_logvar if prior_logvar is not None else _dummy(mu), seed_arg, consts, dmu, dlv,
                dpm if prior_mu is not None else _dummy(mu), dplv if prior_logvar is not None else _dummy(mu), M,
                HAS_PM=prior_mu is not None, HAS_PLV=prior_logvar is not None, RES=bool(residual),
                WITH_Z=grad_z is not None, ELEM=bool(elementwise), BLOCK=BLOCK)
    return dmu, dlv, dpm, dplv

"""The kernel ops of the Gaussian latent ops, declared once for the C++ kernels (fastml::gaussian_kl_{fwd,bwd})
and their Triton twins (fastml::gaussian_kl_{fwd,bwd}_triton).

Shapes: mu, logvar [B, ...] contiguous, one floating dtype; prior_mu, prior_logvar None or the same shape and
dtype (the Python side expands broadcast priors). seed: None (no sample) or an int64 tensor [1] holding the key of
the counter-based noise (reference.py). With (d, r) = (mu - prior_mu, logvar - prior_logvar), or (mu, logvar) when
residual, and everything computed in float32 (float64 for float64 inputs):

    kl_i = 0.5 * (d_i^2 exp(-prior_logvar_i) + exp(r_i) - 1 - r_i)
    z_i  = mean_i + temperature * exp(0.5 * lvq_i) * e_i,   mean = mu (+ prior_mu if residual),
                                                            lvq = logvar (+ prior_logvar if residual)

- gaussian_kl_fwd(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise) -> (z, kl):
  z like mu (an empty [0] tensor without a seed); kl like mu in mu's dtype when elementwise, else the per-sample
  sums [B] in the accumulation dtype.
- gaussian_kl_bwd(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
  -> (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar): grad_z None or like mu; grad_kl like kl. The noise
  is regenerated from the seed. The prior's gradients are empty [0] tensors when the prior is None.
"""
import torch

from fastml._backend import ALL_FLOATS
from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype

FLOATS = ALL_FLOATS


def _tensor(t, name, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have mu's shape {list(like.shape)}, got {list(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{name} must have mu's dtype and device ({like.dtype}, {like.device}), got "
                            f"{t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_fwd(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    _tensor(mu, "mu")
    if mu.dim() < 1:
        raise ValueError("mu must have a batch dimension (at least 1-D)")
    _tensor(logvar, "logvar", mu)
    for t, name in ((prior_mu, "prior_mu"), (prior_logvar, "prior_logvar")):
        if t is not None:
            _tensor(t, name, mu)
    if seed is not None:
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError("seed must be an int64 tensor with one element")
        if seed.device != mu.device:
            raise ValueError(f"seed is on {seed.device} but mu is on {mu.device}")
        if mu.numel() > (1 << 32):
            raise ValueError(f"the noise counter is 32 bits wide: at most 2^32 elements, got {mu.numel()}")


def check_bwd(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    check_fwd(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise)
    if grad_z is not None:
        _tensor(grad_z, "grad_z", mu)
        if seed is None:
            raise ValueError("grad_z needs the seed of the forward's noise")
    if not isinstance(grad_kl, torch.Tensor):
        raise TypeError("grad_kl must be a tensor")
    if elementwise:
        _tensor(grad_kl, "grad_kl", mu)
    else:
        acc = acc_dtype(mu.dtype)
        if grad_kl.shape != (mu.shape[0],) or grad_kl.dtype != acc or not grad_kl.is_contiguous():
            raise ValueError(f"grad_kl must be a contiguous [{mu.shape[0]}] {acc} tensor, got {grad_kl.dtype} "
                             f"{list(grad_kl.shape)}")


def _fwd(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    z = torch.empty_like(mu) if seed is not None else mu.new_empty((0,))
    kl = torch.empty_like(mu) if elementwise else mu.new_empty((mu.shape[0],), dtype=acc_dtype(mu.dtype))
    return z, kl


def _bwd(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise):
    return (torch.empty_like(mu), torch.empty_like(mu),
            torch.empty_like(mu) if prior_mu is not None else mu.new_empty((0,)),
            torch.empty_like(mu) if prior_logvar is not None else mu.new_empty((0,)))


FWD = OpSchema("gaussian_kl_fwd",
               "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, Tensor? seed, bool residual, "
               "float temperature, bool elementwise) -> (Tensor, Tensor)", _fwd, check=check_fwd)
BWD = OpSchema("gaussian_kl_bwd",
               "(Tensor? grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, "
               "Tensor? seed, bool residual, float temperature, bool elementwise) -> (Tensor, Tensor, Tensor, Tensor)",
               _bwd, check=check_bwd)
declare(FWD, BWD)

"""Sampling from logits with temperature, top-k, top-p (nucleus), min-p and always-kept ids, and the matching
filter.

Backends: `reference` (reference.py: sort-based, the definition of the kept set and of the draw), `cpp`
(csrc/cpu/sampling.cpp) and `triton` (kernels/sampling.py), behind the torch ops fastml::sampling_{filter,sample}
and their _triton twins (schema.py). The kernels never sort the vocabulary: they find the top-k and top-p
thresholds by radix selection / bisection on order-preserving integer keys of the values and draw one token by a
Gumbel-max race over counter-based noise, so every backend keeps the same tokens and draws the same token for the
same generator state. The maths, the tie rules and the measurements are in README.md beside this file.
"""
import math
from typing import Callable, NamedTuple

import torch

from fastml import _backend
from fastml._args import floating_tensor, is_real
from fastml._random import draw_seed
from fastml.ops.sampling import reference, schema  # noqa: F401  (schema declares the kernel ops)

OP = "sample"


class _Impl(NamedTuple):
    """What a backend runs: `filter(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value)` and
    `sample(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs) -> (tokens, logprobs)`, with
    the per-row tensors of schema.py."""

    filter: Callable
    sample: Callable


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _eager():
    return not torch.compiler.is_compiling()


def _check_logits(logits):
    floating_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one token (V >= 1), got shape {list(logits.shape)}")
    if logits.shape[1] > schema.MAX_V:
        raise ValueError(f"logits may have at most 2^26 tokens, got V = {logits.shape[1]}")


def _row_tensor(value, name, B, device, *, integer):
    """A per-row tensor [B] given by the caller: checked for shape, dtype and device; returned as float64 (or
    int64 when `integer`)."""
    if value.dim() == 0:
        value = value.reshape(1).expand(B)
    if value.shape != (B,):
        raise ValueError(f"{name} must be a number or a tensor of shape [B] = [{B}], got {list(value.shape)}")
    if integer:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    elif not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logits is on {device}")
    return value.detach().to(torch.int64 if integer else torch.float64).contiguous()


def _temperature(temperature, B, device, *, positive):
    bound = "> 0" if positive else ">= 0"
    if isinstance(temperature, torch.Tensor):
        t = _row_tensor(temperature, "temperature", B, device, integer=False)
        if _eager() and B and not bool((torch.isfinite(t) & ((t > 0) if positive else (t >= 0))).all()):
            raise ValueError(f"temperature must be finite and {bound} in every row")
        return t
    if not is_real(temperature):
        raise TypeError(f"temperature must be a real number or a tensor [B], got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or (t <= 0 if positive else t < 0):
        raise ValueError(f"temperature must be finite and {bound}, got {t}")
    return torch.full((B,), t, dtype=torch.float64, device=device)


def _top_k(top_k, B, device):
    if top_k is None:
        return torch.zeros((B,), dtype=torch.int64, device=device)
    if isinstance(top_k, torch.Tensor):
        k = _row_tensor(top_k, "top_k", B, device, integer=True)
        if _eager() and B and bool((k < 0).any()):
            raise ValueError("top_k must be >= 0 in every row")
        return k
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, a tensor [B] or None, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return torch.full((B,), min(top_k, 2**62), dtype=torch.int64, device=device)


def _probability(value, name, B, device, off):
    if value is None:
        return torch.full((B,), off, dtype=torch.float64, device=device)
    if isinstance(value, torch.Tensor):
        p = _row_tensor(value, name, B, device, integer=False)
        if _eager() and B and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError(f"{name} must be in [0, 1] in every row")
        return p
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, a tensor [B] or None, got {type(value).__name__}")
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return torch.full((B,), p, dtype=torch.float64, device=device)


def _keep_ids(keep_ids, V, device):
    if keep_ids is None:
        return torch.empty((0,), dtype=torch.int64, device=device)
    if isinstance(keep_ids, torch.Tensor):
        if keep_ids.is_floating_point() or keep_ids.is_complex() or keep_ids.dtype == torch.bool:
            raise TypeError(f"keep_ids must be an integer tensor, got dtype {keep_ids.dtype}")
        if keep_ids.dim() != 1:
            raise ValueError(f"keep_ids must be 1-D, got shape {list(keep_ids.shape)}")
        ids = keep_ids.detach().to(device=device, dtype=torch.int64)
        if _eager() and ids.numel() and bool(((ids < 0) | (ids >= V)).any()):
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise IndexError(f"keep_ids holds {bad}, out of range for V = {V} tokens (ids are in [0, {V}))")
    else:
        try:
            items = list(keep_ids)
        except TypeError:
            raise TypeError(f"keep_ids must be a list of ints or a 1-D integer tensor, got "
                            f"{type(keep_ids).__name__}") from None
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"keep_ids must hold ints, got {type(i).__name__}")
            if not 0 <= i < V:
                raise IndexError(f"keep_ids holds {i}, out of range for V = {V} tokens (ids are in [0, {V}))")
        ids = torch.tensor(sorted(set(items)), dtype=torch.int64, device=device)
        return ids
    return torch.unique(ids).contiguous()  # sorted, without repeats


def _params(logits, temperature, top_k, top_p, min_p, keep_ids, *, positive):
    _check_logits(logits)
    B, V = logits.shape
    device = logits.device
    t = _temperature(temperature, B, device, positive=positive)
    k = _top_k(top_k, B, device)
    p = _probability(top_p, "top_p", B, device, 1.0)
    mp = _probability(min_p, "min_p", B, device, 0.0)
    ids = _keep_ids(keep_ids, V, device)
    return t, k, p, torch.log(mp), ids


def _select(logits, backend):
    return _backend.select(OP, _backend.Call(logits.device, logits.dtype), backend).impl


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def top_k_top_p_filter(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, keep_ids=None,
                       filter_value=float("-inf"), backend="auto"):
    """logits / temperature where a token survives the filters, `filter_value` everywhere else ([B, V], the
    logits' dtype; the input is not modified).

    logits [B, V] (float32, float64, float16, bfloat16; computed in float32, float64 for float64). temperature (>
    0), top_k (int >= 0), top_p and min_p (in [0, 1]) are numbers or per-row tensors [B]; None, top_k 0, top_p 1 and
    min_p 0 turn a filter off. In order, on x = logits / temperature: top_k keeps every x >= the k-th largest
    (ties kept; k beyond the finite values keeps them all); top_p keeps, on the softmax of what is left, the
    highest-probability tokens up to the first whose cumulative mass reaches top_p and every token tied with it
    (exactly: the tokens whose mass strictly above them is < top_p times the total, the probabilities taken on an
    integer grid 2^-16 fine in log2 and summed exactly, so the decision does not depend on summation order; the
    max is always kept); min_p keeps p >= min_p * max p; then `keep_ids` (ints or a 1-D integer tensor, the same
    for every row) are put back. A -inf logit is never kept by a filter (it becomes filter_value), a kept one
    stays -inf. A row with a NaN, a +inf or nothing finite raises ValueError.
    """
    t, k, p, lmp, ids = _params(logits, temperature, top_k, top_p, min_p, keep_ids, positive=True)
    if isinstance(filter_value, bool) or not is_real(filter_value):
        raise TypeError(f"filter_value must be a real number, got {type(filter_value).__name__}")
    if math.isnan(float(filter_value)):
        raise ValueError("filter_value must not be NaN")
    if logits.shape[0] == 0:
        return logits.detach().clone()
    return _select(logits, backend).filter(logits.detach().contiguous(), t, k, p, lmp, ids, float(filter_value))


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, keep_ids=None, generator=None,
           return_logprobs=False, backend="auto"):
    """One token per row drawn from softmax(logits / temperature) over the tokens `top_k_top_p_filter` keeps:
    tokens [B] int64, and with return_logprobs their log-probabilities under that filtered distribution ([B],
    float32).

    Same arguments and rules as `top_k_top_p_filter`; temperature 0 (a number or a row's entry) is greedy: the
    lowest id among the row's maxima, filters and keep_ids ignored, log-probability 0. The draw is a Gumbel-max
    race over counter-based noise keyed by a seed taken from `generator` (torch's default generator when None):
    each call advances the generator, the same generator state draws the same tokens on every backend.
    """
    t, k, p, lmp, ids = _params(logits, temperature, top_k, top_p, min_p, keep_ids, positive=False)
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    seed = draw_seed(generator, logits.device, "logits")
    if logits.shape[0] == 0:
        tokens = logits.new_empty((0,), dtype=torch.int64)
        return (tokens, logits.new_empty((0,), dtype=torch.float32)) if return_logprobs else tokens
    tokens, lp = _select(logits, backend).sample(logits.detach().contiguous(), t, k, p, lmp, ids, seed,
                                                 return_logprobs)
    return (tokens, lp) if return_logprobs else tokens


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register():
    ops = torch.ops.fastml
    _backend.register(OP, _backend.Backend("reference", _Impl(reference.top_k_top_p_filter, reference.sample)))
    _backend.register(OP, _backend.Backend("cpp", _Impl(ops.sampling_filter, ops.sampling_sample)))
    _backend.register(OP, _backend.Backend("triton", _Impl(ops.sampling_filter_triton, ops.sampling_sample_triton)))


_register()

__all__ = ["sample", "top_k_top_p_filter"]

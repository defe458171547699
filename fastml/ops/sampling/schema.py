"""The kernel ops of sampling, declared once for the C++ kernels (fastml::sampling_{filter,sample}) and their Triton
twins (fastml::sampling_{filter,sample}_triton).

Shapes: logits [B, V] contiguous (float32, float64, float16, bfloat16); per-row parameters, each [B] contiguous:
temperature float64 (>= 0; the filter needs > 0), top_k int64 (0 = off, >= the number of finite values keeps
them all), top_p float64 (in [0, 1]; 1 = off), log_min_p float64 (log(min_p); -inf = off); keep_ids int64 [n]
(ids in [0, V), possibly empty); seed int64 [1] (the key of the counter-based noise). The kept set and the draw
are defined in reference.py; the kernels find the thresholds without sorting and keep exactly the same set.

- sampling_filter(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value) -> [B, V] in the logits'
  dtype: logits / temperature where kept, filter_value elsewhere.
- sampling_sample(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs) -> (tokens [B] int64,
  log-probabilities [B] float32, or an empty [0] float32 tensor when not logprobs). Rows with temperature 0 are
  greedy (lowest id among the maxima; log-probability 0).

A row with a NaN, a +inf (after the division) or nothing finite raises ValueError naming the row.
"""
import torch

from fastml._backend import ALL_FLOATS
from fastml._library import OpSchema, declare

FLOATS = ALL_FLOATS
MAX_V = 1 << 26


def _fail(cls, msg):
    raise cls(f"fastml::sampling: {msg}")


def _check(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed=None):
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOATS:
        _fail(TypeError, "logits must be a floating tensor")
    if logits.dim() != 2 or logits.shape[1] < 1 or not logits.is_contiguous():
        _fail(ValueError, f"logits must be a contiguous [B, V] tensor with V >= 1, got {list(logits.shape)}")
    B, V = logits.shape
    if V > MAX_V:
        _fail(ValueError, f"V must be at most 2^26, got {V}")
    for t, name, dtype in ((temperature, "temperature", torch.float64), (top_k, "top_k", torch.int64),
                           (top_p, "top_p", torch.float64), (log_min_p, "log_min_p", torch.float64)):
        if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.dtype != dtype or t.device != logits.device \
                or not t.is_contiguous():
            _fail(ValueError, f"{name} must be a contiguous {dtype} tensor of shape [{B}] on {logits.device}")
    if not isinstance(keep_ids, torch.Tensor) or keep_ids.dim() != 1 or keep_ids.dtype != torch.int64 \
            or keep_ids.device != logits.device or not keep_ids.is_contiguous():
        _fail(ValueError, f"keep_ids must be a contiguous 1-D int64 tensor on {logits.device}")
    if keep_ids.numel():
        ok = ((keep_ids >= 0) & (keep_ids < V)).all()
        if logits.is_cuda:
            torch._assert_async(ok, "fastml::sampling: keep_ids out of range [0, V)")
        elif not bool(ok):
            _fail(IndexError, f"keep_ids must be in [0, {V})")
    if seed is not None:
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 \
                or seed.device != logits.device:
            _fail(ValueError, f"seed must be an int64 tensor with one element on {logits.device}")


def check_filter(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value):
    _check(logits, temperature, top_k, top_p, log_min_p, keep_ids)


def check_sample(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs):
    _check(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed)


def _filter(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value):
    return torch.empty_like(logits)


def _sample(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64),
            logits.new_empty((B,) if logprobs else (0,), dtype=torch.float32))


FILTER = OpSchema("sampling_filter",
                  "(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor log_min_p, "
                  "Tensor keep_ids, float filter_value) -> Tensor", _filter, check=check_filter)
SAMPLE = OpSchema("sampling_sample",
                  "(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor log_min_p, "
                  "Tensor keep_ids, Tensor seed, bool logprobs) -> (Tensor, Tensor)", _sample, check=check_sample)
declare(FILTER, SAMPLE)

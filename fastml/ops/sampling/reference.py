"""The definition of sampling and its filters in plain PyTorch, sort-based (README.md beside this file has the maths).

Everything is computed on x = logits / temperature in the accumulation dtype (float32 for half and float32 logits,
float64 for float64 logits), with the temperature first rounded to that dtype. For each row:

- candidates: the finite x (a -inf is never a candidate; NaN and +inf are errors).
- top_k (k > 0 and k < number of candidates): keep x >= the k-th largest candidate (ties kept).
- top_p (p < 1): on what top_k left, with m the row's max and d_i = float64(x_i) - float64(m), each candidate gets
  the integer weight W_i = weight(d_i) (below), Z = sum W_i and S_i = the sum of W_j over candidates with
  x_j > x_i (the mass strictly above x_i). Keep S_i < p * Z (both in float64: float64(S_i) < p * float64(Z)) or
  x_i == m. This is "the highest-probability tokens up to the first whose cumulative mass reaches p, and every
  token tied with it", evaluated on probabilities that are exact integers, so sums do not depend on their order.
- min_p (> 0): keep d_i >= log(min_p) (the log in float64, computed once per row by the caller).
- keep_ids are put back whatever the filters said.

weight(d): t = max(d * log2(e), -64) in float64; u = floor(t * 2^16) as an integer, n = u >> 16 (<= 0),
j = u & 0xFFFF; W = (EXP2_HI[j >> 8] * EXP2_LO[j & 255]) >> (24 - n), 0 where the shift reaches 63. EXP2_HI[a] =
round(2^(a / 256) * 2^30) and EXP2_LO[b] = round(2^(b / 65536) * 2^30) (computed to 50 digits), so W = 2^36 *
2^(floor(t * 2^16) / 2^16) truncated to an integer: the probabilities relative to the max, on a grid 2^-16 fine in
log2 (relative error < 2^-15), summed exactly in int64 (V < 2^26).

The draw is a Gumbel-max over the kept tokens with counter-based noise: token = the lowest id among the maxima of
float64(x_i) + g(seed, row, i), g = -log(-log(u)), u = ((h(row, 2i) >> 6) * 2^26 + (h(row, 2i + 1) >> 6) + 0.5) /
2^52 in (0, 1), and h(r, c) = mix(mix(mix(c ^ k0) + k1) ^ r) (32-bit words, k0 / k1 the low / high halves of the
int64 seed, mix the 32-bit finalizer of fastml/_random.py). Temperature 0 is greedy (lowest id among
the maxima of the logits).
"""
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import torch

from fastml._numerics import acc_dtype
from fastml._random import MASK, mix, split_seed

LOG2E = 1.4426950408889634
WEIGHT_BITS = 36  # W of the row's max
MAX_V = 1 << 26  # sums of weights stay below 2^62


def _exp2_table(denominator):
    with localcontext() as ctx:
        ctx.prec = 50
        return [int((Decimal(2) ** (Decimal(j) / denominator) * (1 << 30)).to_integral_value(ROUND_HALF_EVEN))
                for j in range(256)]


EXP2_HI = _exp2_table(256)
EXP2_LO = _exp2_table(65536)
_TABLES = {}


def tables(device):
    """(EXP2_HI, EXP2_LO) as int64 tensors on `device`."""
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = (torch.tensor(EXP2_HI, dtype=torch.int64, device=device),
                        torch.tensor(EXP2_LO, dtype=torch.int64, device=device))
    return _TABLES[key]


def weights(d):
    """The integer weights W(d) (module docstring) of float64 offsets d <= 0 from the row's max."""
    hi, lo = tables(d.device)
    t = (d * LOG2E).clamp_min(-64.0)
    u = torch.floor(t * 65536.0).to(torch.int64)
    n = u >> 16
    j = u & 0xFFFF
    prod = hi[j >> 8] * lo[j & 255]
    shift = (60 - WEIGHT_BITS) - n
    return torch.where(shift < 63, prod >> shift.clamp_max(62), torch.zeros_like(prod))


def hash_bits(seed, row, c):
    """h(row, c) for int64 tensors row, c (values in [0, 2^32)) and an int64 seed tensor [1]."""
    k0, k1 = split_seed(seed)
    return mix(mix((mix(c ^ k0) + k1) & MASK) ^ row)


def gumbel(seed, row, col):
    """The float64 Gumbel noise g(seed, row, col) of the draw (module docstring)."""
    h1 = hash_bits(seed, row, 2 * col)
    h2 = hash_bits(seed, row, 2 * col + 1)
    u = (((h1 >> 6) << 26) + (h2 >> 6)).to(torch.float64)
    u = (u + 0.5) * 2.0**-52
    return -torch.log(-torch.log(u))


def check_rows(x, name="logits"):
    """ValueError for a row with a NaN, a +inf or nothing finite (x already divided by the temperature)."""
    bad_nan = torch.isnan(x).any(dim=1)
    if bool(bad_nan.any()):
        raise ValueError(f"{name} row {int(bad_nan.nonzero()[0, 0])} contains NaN")
    bad_inf = (x == float("inf")).any(dim=1)
    if bool(bad_inf.any()):
        raise ValueError(f"{name} row {int(bad_inf.nonzero()[0, 0])} contains +inf (after dividing by the "
                         f"temperature)")
    none = ~torch.isfinite(x).any(dim=1)
    if bool(none.any()):
        raise ValueError(f"{name} row {int(none.nonzero()[0, 0])} has no finite value")


def scale(logits, temperature):
    """x = logits / temperature in the accumulation dtype (rows with temperature 0 are divided by 1)."""
    acc = acc_dtype(logits.dtype)
    t = temperature.to(acc)
    t = torch.where(t == 0, torch.ones_like(t), t)
    return logits.to(acc) / t[:, None]


def kept(x, top_k, top_p, log_min_p, keep_ids):
    """The kept mask [B, V] of x (already scaled and checked); top_k int64 [B] (0 off), top_p float64 [B] (>= 1
    off), log_min_p float64 [B] (-inf off), keep_ids int64 [n]."""
    B, V = x.shape
    ninf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    finite = torch.isfinite(x)
    vals = torch.where(finite, x, ninf)
    m = vals.max(dim=1).values
    keep = finite.clone()
    # top-k: the k-th largest candidate, ties kept
    nfin = finite.sum(dim=1)
    active = (top_k > 0) & (top_k < nfin)
    if bool(active.any()):
        srt = vals.sort(dim=1, descending=True).values
        kth = srt.gather(1, (torch.where(active, top_k, torch.ones_like(top_k)) - 1)[:, None])
        keep &= ~active[:, None] | (x >= kth)
    d = x.to(torch.float64) - m.to(torch.float64)[:, None]
    # top-p: the mass strictly above each candidate, from the exact integer weights
    active_p = top_p < 1
    if bool(active_p.any()):
        w = torch.where(keep, weights(d), torch.zeros((), dtype=torch.int64, device=x.device))
        z = w.sum(dim=1)
        asc, order = torch.where(keep, x, ninf).sort(dim=1, stable=True)
        prefix = torch.cat((torch.zeros((B, 1), dtype=torch.int64, device=x.device),
                            w.gather(1, order).cumsum(dim=1)), dim=1)
        below = prefix.gather(1, torch.searchsorted(asc, x.contiguous(), right=True))  # mass of candidates <= x_i
        above = z[:, None] - below
        keep_p = (above.to(torch.float64) < (top_p * z.to(torch.float64))[:, None]) | (x == m[:, None])
        keep &= ~active_p[:, None] | keep_p
    keep &= d >= log_min_p[:, None]
    if keep_ids.numel():
        keep[:, keep_ids] = True
    return keep


def top_k_top_p_filter(logits, temperature, top_k, top_p, log_min_p, keep_ids, filter_value):
    """logits / temperature where kept, filter_value elsewhere, in the logits' dtype (parameters as `kept`)."""
    x = scale(logits, temperature)
    check_rows(x)
    keep = kept(x, top_k, top_p, log_min_p, keep_ids)
    fill = torch.tensor(filter_value, dtype=x.dtype, device=x.device)
    return torch.where(keep, x, fill).to(logits.dtype)


def sample(logits, temperature, top_k, top_p, log_min_p, keep_ids, seed, logprobs):
    """(tokens [B] int64, log-probabilities [B] float32 or an empty tensor): the Gumbel-max draw over the kept set
    (module docstring); rows with temperature 0 are greedy with log-probability 0."""
    B, V = logits.shape
    x = scale(logits, temperature)
    check_rows(x)
    greedy = temperature == 0
    keep = kept(x, top_k, top_p, log_min_p, keep_ids)
    rows, cols = keep.nonzero(as_tuple=True)
    score = torch.full((B, V), float("-inf"), dtype=torch.float64, device=logits.device)
    score[rows, cols] = x[rows, cols].to(torch.float64) + gumbel(seed, rows, cols)
    tokens = score.argmax(dim=1)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.to(acc_dtype(logits.dtype)).argmax(dim=1), tokens)
    if not logprobs:
        return tokens, logits.new_empty((0,), dtype=torch.float32)
    x64 = x.to(torch.float64)
    m = torch.where(torch.isfinite(x64), x64, float("-inf")).max(dim=1, keepdim=True).values
    lse = torch.where(keep, x64 - m, float("-inf")).logsumexp(dim=1)
    lp = x64.gather(1, tokens[:, None])[:, 0] - m[:, 0] - lse
    lp = torch.where(greedy, torch.zeros_like(lp), lp)
    return tokens, lp.to(torch.float32)

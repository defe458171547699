"""Triton kernel of Perturbed Masking's distance, the kernel of the torch op fastml::perturbed_masking_distance_triton
(declared in fastml/ops/perturbed_masking/schema.py).

One program per output m: it walks the hidden dim in blocks of BD, sums the states of the word's tokens
(states[rows[m], starts[m]:ends[m], block]) in registers, divides by the word's length and folds the block into the
running sums (squared difference for "euclidean"; dot and both squared norms for "cosine"). The word vector is never
written out. Computed in float32 (float64 for float64 states).
"""
import torch
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import device_of
from fastml.ops.perturbed_masking.schema import COSINE_EPS

MAX_BD = 1024


@triton.jit
def _distance_kernel(states, rows, starts, ends, anchors, anchor_index, out, T, D, eps, COSINE: tl.constexpr,
                     BD: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    at = out.dtype.element_ty
    row = tl.load(rows + m)
    s = tl.load(starts + m)
    e = tl.load(ends + m)
    a_row = tl.load(anchor_index + m)
    inv_len = 1.0 / (e - s).to(at)
    sq = tl.zeros([BD], at)
    dot = tl.zeros([BD], at)
    aa = tl.zeros([BD], at)
    vv = tl.zeros([BD], at)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cm = cols < D
        v = tl.zeros([BD], at)
        for t in range(s, e):
            v += tl.load(states + (row * T + t) * D + cols, mask=cm, other=0.0).to(at)
        v = v * inv_len
        a = tl.load(anchors + a_row * D + cols, mask=cm, other=0.0).to(at)
        if COSINE:
            dot += a * v
            aa += a * a
            vv += v * v
        else:
            diff = a - v
            sq += diff * diff
    if COSINE:
        norms = tl.sqrt(tl.sum(aa, 0)) * tl.sqrt(tl.sum(vv, 0))
        res = 1.0 - tl.sum(dot, 0) / tl.maximum(norms, eps)
    else:
        res = tl.sqrt(tl.sum(sq, 0))
    tl.store(out + m, res)


@implement("perturbed_masking_distance", "triton")
def perturbed_masking_distance(states, rows, starts, ends, anchors, anchor_index, metric):
    R, T, D = states.shape
    M = rows.shape[0]
    out = torch.empty((M,), dtype=acc_dtype(states.dtype), device=states.device)
    if M == 0:
        return out
    BD = min(MAX_BD, triton.next_power_of_2(max(D, 16)))
    with device_of(states):
        _distance_kernel[(M,)](states, rows, starts, ends, anchors, anchor_index, out, T, D, COSINE_EPS,
                               COSINE=metric == "cosine", BD=BD)
    return out

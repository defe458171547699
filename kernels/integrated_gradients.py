"""Triton path kernels of integrated gradients, as the torch ops fastml::ig_scale_inputs_triton and
fastml::ig_accumulate_triton (semantics in csrc/fastml.cpp). Both are streaming: each program owns a tile of one
example's flattened elements and walks the steps, so memory traffic is one read of every gradient.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastml.kernels.common import device_of

BLOCK = 1024


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _scale_kernel(x, xb, alphas, out, D, BLOCK: tl.constexpr):
    # out[s] = x' + alpha_s (x - x') for the tile of flattened elements [i*BLOCK, (i+1)*BLOCK).
    i = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    a = tl.load(alphas + s)
    b = tl.load(xb + offs, mask=m, other=0.0).to(a.dtype)
    xv = tl.load(x + offs, mask=m, other=0.0).to(a.dtype)
    tl.store(out + s * D + offs, (b + a * (xv - b)).to(out.dtype.element_ty), mask=m)


@triton.jit
def _accumulate_kernel(g, x, xb, w, acc, attr, partial, S, step, D, n_tiles, MULTIPLY: tl.constexpr,
                       HAS_ACC: tl.constexpr, BLOCK: tl.constexpr):
    # total = acc + sum_s w_s g[s*B + b] over one tile of example b; attr = total (x - x') or total; the tile's sum
    # goes to partial[b, tile] so that the per-example sums are reduced in a fixed order.
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    base = b * D + offs
    if HAS_ACC:
        total = tl.load(acc + base, mask=m, other=0.0)
    else:
        total = tl.zeros([BLOCK], dtype=attr.dtype.element_ty)
    # step = B * D elements between consecutive steps; walking by pointer increments keeps 64-bit addresses.
    gp = g + base
    for s in range(0, S):
        ws = tl.load(w + s)
        total += ws * tl.load(gp, mask=m, other=0.0).to(ws.dtype)
        gp += step
    if MULTIPLY:
        diff = tl.load(x + base, mask=m, other=0.0).to(total.dtype) - tl.load(xb + base, mask=m, other=0.0).to(
            total.dtype)
        total = total * diff
    tl.store(attr + base, total, mask=m)
    tl.store(partial + b * n_tiles + i, tl.sum(total, 0))


@torch.library.custom_op("fastml::ig_scale_inputs_triton", mutates_args=())
def ig_scale_inputs_triton(inputs: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Triton twin of fastml::ig_scale_inputs: out[s*B + b] = baselines[b] + alphas[s] (inputs[b] - baselines[b])."""
    S = alphas.shape[0]
    out = inputs.new_empty((S * inputs.shape[0],) + tuple(inputs.shape[1:]))
    D = inputs.numel()
    if S == 0 or D == 0:
        return out
    a = alphas.to(_acc_dtype(inputs.dtype)).contiguous()
    # The kernel reads flat element offsets: strided views and broadcast baselines are copied once to dense.
    x, xb = inputs.contiguous(), baselines.expand(inputs.shape).contiguous()
    with device_of(inputs):
        _scale_kernel[(triton.cdiv(D, BLOCK), S)](x, xb, a, out, D, BLOCK=BLOCK)
    return out


@ig_scale_inputs_triton.register_fake
def _(inputs, baselines, alphas):
    return inputs.new_empty((alphas.shape[0] * inputs.shape[0],) + tuple(inputs.shape[1:]))


@torch.library.custom_op("fastml::ig_accumulate_triton", mutates_args=())
def ig_accumulate_triton(grads: torch.Tensor, inputs: torch.Tensor, baselines: torch.Tensor, weights: torch.Tensor,
                         multiply_by_inputs: bool, acc: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of fastml::ig_accumulate: (attr [B, ...], sums [B]) in float32 (float64 for float64 grads)."""
    dt = _acc_dtype(inputs.dtype)
    B = inputs.shape[0]
    attr = inputs.new_empty(inputs.shape, dtype=dt)
    D = inputs.numel() // B if B else 0
    if attr.numel() == 0:
        return attr, inputs.new_zeros(B, dtype=dt)
    n_tiles = triton.cdiv(D, BLOCK)
    partial = inputs.new_empty(B, n_tiles, dtype=dt)
    w = weights.to(dt).contiguous()
    # Flat element offsets, as in the scale kernel: dense copies of strided or broadcast operands (x and x' are read
    # only for the product with x - x').
    g, a = grads.contiguous(), None if acc is None else acc.contiguous()
    x, xb = (inputs.contiguous(), baselines.expand(inputs.shape).contiguous()) if multiply_by_inputs else (g, g)
    with device_of(inputs):
        _accumulate_kernel[(n_tiles, B)](g, x, xb, w, a, attr, partial, w.shape[0], B * D, D, n_tiles,
                                         MULTIPLY=multiply_by_inputs, HAS_ACC=acc is not None, BLOCK=BLOCK)
    return attr, partial.sum(1)


@ig_accumulate_triton.register_fake
def _(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    dt = _acc_dtype(inputs.dtype)
    return inputs.new_empty(inputs.shape, dtype=dt), inputs.new_empty(inputs.shape[0], dtype=dt)

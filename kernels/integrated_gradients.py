"""Triton path kernels of integrated gradients, the kernels of the torch ops fastml::ig_scale_inputs_triton and
fastml::ig_accumulate_triton (declared in fastml/ops/integrated_gradients/schema.py). Both are streaming: each
program owns a tile of one example's flattened elements and walks the steps, so memory traffic is one read of
every gradient.
"""
import triton
import triton.language as tl

from fastml._library import implement
from fastml._numerics import acc_dtype
from fastml.kernels.common import device_of

BLOCK = 1024


@triton.jit
def _scale_kernel(x, xb, alphas, out, S, D, BLOCK: tl.constexpr):
    # out[s] = x' + alpha_s (x - x') for every step s, over the tile of flattened elements [i*BLOCK, (i+1)*BLOCK):
    # x and x' are read once and the steps walked here, so the grid is the tiles alone (axis 0).
    i = tl.program_id(0)
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    at = alphas.dtype.element_ty
    b = tl.load(xb + offs, mask=m, other=0.0).to(at)
    diff = tl.load(x + offs, mask=m, other=0.0).to(at) - b
    # D elements between consecutive steps; walking by pointer increments keeps 64-bit addresses.
    op = out + offs
    for s in range(0, S):
        a = tl.load(alphas + s)
        tl.store(op, (b + a * diff).to(out.dtype.element_ty), mask=m)
        op += D


@triton.jit
def _accumulate_kernel(g, x, xb, w, acc, attr, partial, S, step, B, D, n_tiles, MULTIPLY: tl.constexpr,
                       HAS_ACC: tl.constexpr, EB: tl.constexpr, BD: tl.constexpr):
    # total = acc + sum_s w_s g[s*B + b] over a tile of EB examples x BD elements (EB > 1 packs small examples,
    # e.g. tabular rows, into one program); attr = total (x - x') or total; each example's sum over the tile goes
    # to partial[b, tile] so that the per-example sums are reduced in a fixed order. Groups of examples and tiles
    # share grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535, fewer than a large batch).
    pid = tl.program_id(0).to(tl.int64)
    i = pid % n_tiles
    rows = (pid // n_tiles) * EB + tl.arange(0, EB)
    cols = i * BD + tl.arange(0, BD)
    mr = rows < B
    m = mr[:, None] & (cols < D)[None, :]
    base = rows[:, None] * D + cols[None, :]
    if HAS_ACC:
        total = tl.load(acc + base, mask=m, other=0.0)
    else:
        total = tl.zeros([EB, BD], dtype=attr.dtype.element_ty)
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
    tl.store(partial + rows * n_tiles + i, tl.sum(total, 1), mask=mr)


@implement("ig_scale_inputs", "triton")
def ig_scale_inputs_triton(inputs, baselines, alphas):
    """Triton twin of fastml::ig_scale_inputs: out[s*B + b] = baselines[b] + alphas[s] (inputs[b] - baselines[b])."""
    S = alphas.shape[0]
    out = inputs.new_empty((S * inputs.shape[0],) + tuple(inputs.shape[1:]))
    D = inputs.numel()
    if S == 0 or D == 0:
        return out
    a = alphas.to(acc_dtype(inputs.dtype)).contiguous()
    # The kernel reads flat element offsets: strided views and expanded (broadcast) baselines are copied to dense.
    x, xb = inputs.contiguous(), baselines.contiguous()
    with device_of(inputs):
        _scale_kernel[(triton.cdiv(D, BLOCK),)](x, xb, a, out, S, D, BLOCK=BLOCK)
    return out


@implement("ig_accumulate", "triton")
def ig_accumulate_triton(grads, inputs, baselines, weights, multiply_by_inputs, acc):
    """Triton twin of fastml::ig_accumulate: (attr [B, ...], sums [B]) in float32 (float64 for float64 grads)."""
    dt = acc_dtype(inputs.dtype)
    B = inputs.shape[0]
    attr = inputs.new_empty(inputs.shape, dtype=dt)
    D = inputs.numel() // B if B else 0
    if attr.numel() == 0:
        return attr, inputs.new_zeros(B, dtype=dt)
    # Tiles of BLOCK elements: BD of each of EB examples (EB > 1 only for examples smaller than BLOCK).
    BD = min(BLOCK, triton.next_power_of_2(max(D, 4)))
    EB = BLOCK // BD
    n_tiles = triton.cdiv(D, BD)
    partial = inputs.new_empty(B, n_tiles, dtype=dt)
    w = weights.to(dt).contiguous()
    # Flat element offsets, as in the scale kernel: dense copies of strided or broadcast operands (x and x' are read
    # only for the product with x - x').
    g, a = grads.contiguous(), None if acc is None else acc.contiguous()
    x, xb = (inputs.contiguous(), baselines.contiguous()) if multiply_by_inputs else (g, g)
    with device_of(inputs):
        _accumulate_kernel[(triton.cdiv(B, EB) * n_tiles,)](
            g, x, xb, w, a, attr, partial, w.shape[0], B * D, B, D, n_tiles, MULTIPLY=multiply_by_inputs,
            HAS_ACC=acc is not None, EB=EB, BD=BD)
    return attr, partial.sum(1)

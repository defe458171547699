"""The streaming IG engine shared by integrated_gradients and LayerIntegratedGradients.

A problem (IGProblem in __init__.py, LayerProblem in layer.py) has the path's end points `inputs` and
`baselines` (tuples of [B, ...] tensors), `grads(scaled, idx, steps)`: the gradients (a tuple like `scaled`) of
the selected output at the scaled points of the examples `idx` ([steps*len(idx), ...] per tensor, step-major),
and `endpoint_outputs()`: (F(inputs), F(baselines)), the selected output summed per example, [B] each.

The engine walks the quadrature nodes in chunks of steps: ig_scale_inputs builds a chunk's points, the model
gives their gradients, ig_accumulate folds them into a running sum. Memory beyond the model's activations is one chunk of points and gradients plus one
running sum per refinement level: it does not grow with n_steps.
"""
import warnings

import torch

from fastml.ops.integrated_gradients import path, quadrature
from fastml.ops.integrated_gradients._validate import is_adaptive
from fastml.ops.integrated_gradients.reference import acc_dtype

# A chunk's scaled inputs are sized to this many bytes (the model's activations scale with them, and on a CPU a
# few MiB of input rows keep convolutions and GEMMs at full speed without the activations leaving memory bounds).
CHUNK_BYTES = 2 * 2**20
# ... and never more than this many steps, so that memory stays bounded for small inputs and large n_steps.
MAX_CHUNK_STEPS = 32


def chunk_steps(inputs, n_active, internal_batch_size, batch, n_steps):
    """Steps per model call for a rule of n_steps nodes: Captum's rule with internal_batch_size, else sized by
    CHUNK_BYTES and never all steps at once (at most half of them, so memory never holds a whole rule's points)."""
    if internal_batch_size is not None:
        if internal_batch_size < batch:
            warnings.warn(f"internal_batch_size {internal_batch_size} is below the number of examples {batch}: "
                          "one step per model call", stacklevel=4)
        return max(1, internal_batch_size // n_active)
    step_bytes = n_active * sum(t[0].numel() * t.element_size() for t in inputs)
    return int(max(1, min(MAX_CHUNK_STEPS, (n_steps + 1) // 2, CHUNK_BYTES // max(1, step_bytes))))


class _Progress:
    def __init__(self, enabled, total):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="integrated gradients", unit="rows")

    def update(self, rows, extra_total=0):
        if self.bar is not None:
            if extra_total:
                self.bar.total += extra_total
                self.bar.refresh()
            self.bar.update(rows)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _tensor(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def run(problem, *, method, n_steps, internal_batch_size, multiply_by_inputs, want_delta, rtol, atol, max_steps,
        progress, backend):
    """(attributions tuple, delta [B] or None)."""
    inputs, baselines = problem.inputs, problem.baselines
    batch = inputs[0].shape[0]
    device = inputs[0].device
    dtype = acc_dtype(inputs[0].dtype)
    adaptive = is_adaptive(rtol, atol)
    rtol = 0.0 if rtol is None else rtol
    levels = quadrature.nested_levels(method, n_steps, max_steps) if adaptive else [quadrature.rule(method, n_steps)]
    rows_planned = n_steps * batch + (2 * batch if want_delta or adaptive else 0)
    bar = _Progress(progress, rows_planned)
    try:
        diff = None
        if want_delta or adaptive:
            f_in, f_base = problem.endpoint_outputs()
            diff = f_in - f_base
            bar.update(2 * batch)
        out = [None] * len(inputs)
        sums_out = None
        active = list(range(batch))
        x, xb = inputs, baselines
        accs = [[None] * len(inputs) for _ in levels]
        for level, (new_alphas, _) in enumerate(levels):
            if level > 0:
                bar.update(0, extra_total=len(new_alphas) * len(active))
            offset = sum(len(a) for a, _ in levels[:level])
            c = chunk_steps(x, len(active), internal_batch_size, batch, len(new_alphas))
            for start in range(0, len(new_alphas), c):
                stop = min(start + c, len(new_alphas))
                alphas = _tensor(new_alphas[start:stop], dtype, device)
                scaled = tuple(path.ig_scale_inputs(xi, bi, alphas, backend=backend).requires_grad_()
                               for xi, bi in zip(x, xb))
                grads = problem.grads(scaled, active, stop - start)
                del scaled
                bar.update((stop - start) * len(active))
                last = stop == len(new_alphas)
                # Every later level's rule also weighs these nodes: fold them into each level's running sum.
                for k in range(level, len(levels)):
                    w = _tensor(levels[k][1][offset + start: offset + stop], dtype, device)
                    for i, g in enumerate(grads):
                        mul = multiply_by_inputs and last and k == level
                        accs[k][i], s = path.ig_accumulate(g, x[i], xb[i], w, multiply_by_inputs=mul, return_sums=True,
                                                           acc=accs[k][i], backend=backend)
                        if last and k == level:
                            sums = s if i == 0 else sums + s
                del grads
            attrs = accs[level]
            accs[level] = [None] * len(inputs)
            if not adaptive:
                out, sums_out = list(attrs), sums
                break
            if multiply_by_inputs:
                complete = sums
            else:
                complete = sum((a * (xi.to(dtype) - bi.to(dtype))).reshape(len(active), -1).sum(1)
                               for a, xi, bi in zip(attrs, x, xb))
            d = diff[active].to(dtype)
            tol = torch.clamp(rtol * d.abs(), min=atol)
            done = (complete - d).abs() <= tol
            if level == len(levels) - 1:
                done = torch.ones_like(done)
            keep = (~done).nonzero().flatten()
            fin = done.nonzero().flatten()
            idx_fin = torch.as_tensor(active, device=device)[fin]
            for i, a in enumerate(attrs):
                if out[i] is None:
                    out[i] = a.new_empty(inputs[i].shape)
                out[i][idx_fin] = a[fin]
            if sums_out is None:
                sums_out = sums.new_empty(batch)
            sums_out[idx_fin] = sums[fin]
            if keep.numel() == 0:
                break
            active = [active[j] for j in keep.tolist()]
            x = tuple(t[keep] for t in x)
            xb = tuple(t[keep] for t in xb)
            accs = [[None if a is None else a[keep] for a in row] for row in accs]
        if adaptive:
            err = (sums_out if multiply_by_inputs else _complete(out, inputs, baselines, dtype)) - diff.to(dtype)
            bad = (err.abs() > torch.clamp(rtol * diff.to(dtype).abs(), min=atol)).nonzero().flatten().tolist()
            if bad:
                total = sum(len(a) for a, _ in levels)
                warnings.warn(f"integrated_gradients: examples {bad} did not reach rtol={rtol}, atol={atol} within "
                              f"{total} steps (max_steps={max_steps}, method={method!r})", stacklevel=3)
    finally:
        bar.close()
    delta = None
    if want_delta:
        delta = sums_out - diff.to(sums_out.dtype)
    return tuple(out), delta


def _complete(attrs, inputs, baselines, dtype):
    return sum((a * (x.to(dtype) - b.to(dtype))).reshape(x.shape[0], -1).sum(1)
               for a, x, b in zip(attrs, inputs, baselines))

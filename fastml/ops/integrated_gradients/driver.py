"""The streaming IG engine shared by integrated_gradients and LayerIntegratedGradients.

A problem (_problem.py) has the path's end points `inputs` and `baselines` (tuples of [B, ...] tensors),
`grads(points, idx, steps)`: the gradients of the selected output at given points, and `endpoint_outputs()`.

Three ways through it: a fixed rule (`run_fixed`: every example shares the nodes, ig_scale_inputs builds a chunk of
steps for the whole batch, ig_accumulate folds it into a running sum), adaptive mode (adaptive.py) and exact IG of
piecewise-linear models (exact.py). The last two give every example its own nodes; `weighted_sums` evaluates such
per-example rules in chunks of rows through the same two path kernels. Memory beyond the model's activations is one
chunk of points and gradients plus the running sums: it does not grow with the number of nodes.
"""
import functools
import warnings

import torch

from fastml._numerics import acc_dtype
from fastml.ops.integrated_gradients import path, quadrature

# A chunk's scaled inputs are sized to this many bytes (the model's activations scale with them, and on a CPU a
# few MiB of input rows keep convolutions and GEMMs at full speed without the activations leaving memory bounds).
CHUNK_BYTES = 2 * 2**20
# ... and never more than this many steps, so that memory stays bounded for small inputs and large n_steps.
MAX_CHUNK_STEPS = 32
# Captum's default number of steps, used when n_steps is None outside adaptive mode.
DEFAULT_STEPS = 50


def widest_dtype(tensors):
    """The accumulation dtype of a computation over all `tensors`: float64 as soon as one of them is float64."""
    return acc_dtype(functools.reduce(torch.promote_types, (t.dtype for t in tensors)))


def _row_bytes(inputs):
    return sum(t[0].numel() * t.element_size() for t in inputs)


def chunk_steps(inputs, n_active, internal_batch_size, batch, n_steps):
    """Steps per model call for a rule of n_steps nodes: Captum's rule with internal_batch_size, else sized by
    CHUNK_BYTES and never all steps at once (at most half of them, so memory never holds a whole rule's points)."""
    if internal_batch_size is not None:
        warn_small_batch(internal_batch_size, batch)
        return max(1, internal_batch_size // n_active)
    step_bytes = n_active * _row_bytes(inputs)
    return int(max(1, min(MAX_CHUNK_STEPS, (n_steps + 1) // 2, CHUNK_BYTES // max(1, step_bytes))))


def warn_small_batch(internal_batch_size, batch):
    if internal_batch_size < batch:
        warnings.warn(f"internal_batch_size {internal_batch_size} is below the number of examples {batch}: "
                      "one step per model call", stacklevel=5)


def chunk_rows(inputs, internal_batch_size):
    """Rows per model call when every example has its own nodes: internal_batch_size, or as many rows as fit
    CHUNK_BYTES, at most MAX_CHUNK_STEPS per example of the batch."""
    if internal_batch_size is not None:
        return internal_batch_size
    batch = inputs[0].shape[0]
    return int(max(1, min(MAX_CHUNK_STEPS * batch, CHUNK_BYTES // max(1, _row_bytes(inputs)))))


class Progress:
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


def run_fixed(problem, *, method, n_steps, internal_batch_size, multiply_by_inputs, backend, bar):
    """One rule shared by every example: (attributions tuple, their per-example sums [B])."""
    inputs, baselines = problem.inputs, problem.baselines
    batch, device = inputs[0].shape[0], inputs[0].device
    alphas, weights = quadrature.rule(method, n_steps)
    c = chunk_steps(inputs, batch, internal_batch_size, batch, n_steps)
    accs = [None] * len(inputs)
    sums = None
    for start in range(0, n_steps, c):
        stop = min(start + c, n_steps)
        # Nodes and weights in each input's own accumulation dtype: float64 inputs get float64 nodes whatever the
        # dtype of the others.
        scaled = tuple(path.ig_scale_inputs(x, b, _tensor(alphas[start:stop], acc_dtype(x.dtype), device),
                                            backend=backend).requires_grad_() for x, b in zip(inputs, baselines))
        grads = problem.grads(scaled, range(batch), stop - start)
        del scaled
        bar.update((stop - start) * batch)
        last = stop == n_steps
        for i, (g, x, b) in enumerate(zip(grads, inputs, baselines)):
            w = _tensor(weights[start:stop], acc_dtype(x.dtype), device)
            accs[i], s = path.ig_accumulate(g, x, b, w, multiply_by_inputs=multiply_by_inputs and last,
                                            return_sums=True, acc=accs[i], backend=backend)
            if last:
                sums = s.to(widest_dtype(inputs)) if sums is None else sums + s
        del grads
    return tuple(accs), sums


def weighted_sums(problem, jobs, *, max_rows, backend, bar):
    """Per-example rules on subintervals, through the model in chunks of at most max_rows rows.

    jobs: a list of (example e, a, b, rule) with rule = (t [S], weights [K, S]) numpy on [0, 1], the same object for
    jobs that share it. Returns, per job, K tuples (one tensor [1, ...] per input, in its accumulation dtype) of
    (b - a) * sum_s weights[k, s] * dF/dz(z(a + t_s (b - a))) for example e, without the factor (x - x').

    Jobs that share a rule are evaluated together: each is a pseudo-example whose "baseline" is z(a) and "input"
    z(b), so ig_scale_inputs builds their points step-major and ig_accumulate contracts their gradients with the
    rule's weights, as for a fixed rule. A group larger than max_rows is split over pseudo-examples, and a rule
    with more than max_rows nodes over its steps (the sums carried in `acc`).
    """
    inputs = problem.inputs
    device = inputs[0].device
    out = [None] * len(jobs)
    groups = {}
    for j, job in enumerate(jobs):
        groups.setdefault(id(job[3]), []).append(j)
    for members in groups.values():
        t, weights = jobs[members[0]][3]
        per_call = max(1, max_rows // len(t))
        for start in range(0, len(members), per_call):
            chunk = members[start: start + per_call]
            sums = _run_group(problem, [jobs[j] for j in chunk], t, weights, max_rows, device, backend, bar)
            for n, j in enumerate(chunk):
                out[j] = [tuple(s[n: n + 1] for s in per_k) for per_k in sums]
    return out


def _run_group(problem, jobs, t, weights, max_rows, device, backend, bar):
    """K tuples of [J, ...] sums for J jobs sharing the rule (t, weights)."""
    inputs, baselines = problem.inputs, problem.baselines
    idx = [e for e, _, _, _ in jobs]
    index = torch.as_tensor(idx, device=device)
    ends = []
    for x, b in zip(inputs, baselines):
        dt = acc_dtype(x.dtype)
        lo = torch.as_tensor([a for _, a, _, _ in jobs], dtype=dt, device=device).view(-1, *([1] * (x.dim() - 1)))
        hi = torch.as_tensor([c for _, _, c, _ in jobs], dtype=dt, device=device).view_as(lo)
        xb, d = b[index].to(dt), (x[index].to(dt) - b[index].to(dt))
        ends.append(((xb + hi * d).to(x.dtype), (xb + lo * d).to(x.dtype), (hi - lo).flatten()))
    acc = [[None] * len(inputs) for _ in weights]
    steps = max(1, max_rows // len(jobs))
    for start in range(0, len(t), steps):
        stop = min(start + steps, len(t))
        points = tuple(path.ig_scale_inputs(hi, lo, _tensor(t[start:stop], acc_dtype(x.dtype), device),
                                            backend=backend).requires_grad_()
                       for x, (hi, lo, _) in zip(inputs, ends))
        grads = problem.grads(points, idx, stop - start)
        del points
        bar.update((stop - start) * len(jobs))
        for i, (g, x, (hi, lo, _)) in enumerate(zip(grads, inputs, ends)):
            for k, wk in enumerate(weights):
                w = _tensor(wk[start:stop], acc_dtype(x.dtype), device)
                acc[k][i] = path.ig_accumulate(g, hi, lo, w, multiply_by_inputs=False, acc=acc[k][i],
                                               backend=backend)
        del grads
    return [tuple(a * length.view(-1, *([1] * (a.dim() - 1))) for a, (_, _, length) in zip(per_k, ends))
            for per_k in acc]


def finish(problem, totals, multiply_by_inputs):
    """Per-example integrals (a list over examples of tuples [1, ...]) -> (attributions tuple [B, ...], sums)."""
    attrs = []
    for i, (x, b) in enumerate(zip(problem.inputs, problem.baselines)):
        a = torch.cat([t[i] for t in totals])
        if multiply_by_inputs:
            a = a * (x.to(a.dtype) - b.to(a.dtype))
        attrs.append(a.to(acc_dtype(x.dtype)))
    dtype = widest_dtype(problem.inputs)
    sums = sum(a.reshape(a.shape[0], -1).sum(1).to(dtype) for a in attrs)
    return tuple(attrs), sums


def run(problem, *, method, n_steps, internal_batch_size, multiply_by_inputs, want_delta, rtol, atol, max_steps,
        max_segments, progress, backend):
    """(attributions tuple, delta [B] or None)."""
    from fastml.ops.integrated_gradients import adaptive, exact
    from fastml.ops.integrated_gradients._validate import is_adaptive

    batch = problem.inputs[0].shape[0]
    adapt = is_adaptive(rtol, atol)
    need_diff = want_delta or adapt
    fixed = method != "exact" and not adapt
    # Adaptive mode and the exact method add their rows to the bar's total as they plan them.
    bar = Progress(progress, ((n_steps or DEFAULT_STEPS) * batch if fixed else 0) + (2 * batch if need_diff else 0))
    try:
        diff = None
        if need_diff:
            f_in, f_base = problem.endpoint_outputs()
            diff = (f_in - f_base).to(widest_dtype(problem.inputs))
            bar.update(2 * batch)
        if method == "exact":
            attrs, sums = exact.run(problem, internal_batch_size=internal_batch_size,
                                    multiply_by_inputs=multiply_by_inputs, max_segments=max_segments,
                                    backend=backend, bar=bar)
        elif adapt:
            attrs, sums = adaptive.run(problem, diff, method=method, n_steps=n_steps,
                                       internal_batch_size=internal_batch_size,
                                       multiply_by_inputs=multiply_by_inputs, rtol=rtol, atol=atol,
                                       max_steps=max_steps, backend=backend, bar=bar)
        else:
            attrs, sums = run_fixed(problem, method=method, n_steps=n_steps or DEFAULT_STEPS,
                                    internal_batch_size=internal_batch_size, multiply_by_inputs=multiply_by_inputs,
                                    backend=backend, bar=bar)
    finally:
        bar.close()
    delta = sums - diff.to(sums.dtype) if want_delta else None
    return attrs, delta

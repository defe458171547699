"""Adaptive IG: per-example error control by subdivision of [0, 1] (README.md, "Adaptive mode").

Every example keeps a set of subintervals of [0, 1] covering it. Each subinterval carries a nested pair of rules
(a coarse rule and its extension, which reuses the coarse nodes): the extension's value is the estimate, and the
difference between the two, multiplied by (x - x') and measured as a norm over every feature, is the subinterval's
error estimate. An example is done when the norm of the summed estimates is at most
max(rtol * ||attribution||, atol), and its completeness error too.
Otherwise the subintervals with the largest estimates are halved, QUADPACK-style, so that nodes gather where the
integrand is not smooth (the kinks of ReLU networks) and smooth stretches keep their few nodes. The halves of all
examples' split subintervals go through the model together, in chunks (driver.weighted_sums).
"""
import math
import warnings

import numpy as np
import torch

from fastml.ops.integrated_gradients import driver, quadrature

# The least share of an example's error norms that one round of splits covers.
MIN_SHARE = 0.5
# The coarse rule of a subinterval, per method (its nested extension is the estimate): Gauss-Legendre 2 and its
# Kronrod extension (5 nodes), or the smallest Riemann rule and its refinement.
SUB_STEPS = {"gausslegendre": 2, "riemann_left": 1, "riemann_right": 1, "riemann_middle": 1, "riemann_trapezoid": 2}


def pair(method, n):
    """(alphas [S], weights [2, S]) on [0, 1]: the extension of `method` with n nodes (row 0) and the rule itself
    (row 1, zero on the extension's new nodes)."""
    (a0, w0), (a1, w1) = quadrature.nested_pair(method, n)
    alphas = np.concatenate([a0, a1])
    weights = np.stack([w1, np.concatenate([w0, np.zeros(len(a1))])])
    return alphas, weights


def first_pair_size(method, n_steps):
    """Nodes of the first round of adaptive mode (max_steps may not be smaller)."""
    if method == "riemann_trapezoid":
        return 2 * (n_steps or 2) - 1
    return len(pair(method, n_steps if n_steps is not None else SUB_STEPS[method])[0])


class _Interval:
    """[a, b] of example e with its estimate `value` (a tuple over inputs), `gap` = fine minus coarse rule (the
    same shape), `err` = ||gap * factor|| (set by the caller), its rule `kind` and what that kind keeps for its
    children: the parent's err (Gauss-Kronrod) or the gradients at the ends and midpoint (trapezoid)."""
    __slots__ = ("e", "a", "b", "value", "gap", "err", "kind", "kept")

    def __init__(self, e, a, b, value, gap, kind, kept):
        self.e, self.a, self.b, self.value, self.gap, self.kind, self.kept = e, a, b, value, gap, kind, kept
        self.err = 0.0


# A Gauss-Kronrod child that keeps more than this share of its parent's error norm sits on a kink (where the
# integrand is smooth a child keeps about 1/32 of it): its halves switch to the trapezoid rules.
KINK_SHARE = 0.25


class _Scheme:
    """The rules of the subintervals. A pending item is (kind, e, a, b, kept):

    - "gk": a Gauss-Legendre rule and its Kronrod extension (Riemann methods: the rule and its refinement); the
      first item of every example unless method is riemann_trapezoid (its interval is of kind "gk0": its rule is
      `method` with n_steps nodes). kept: the parent's err (None for the first interval's halves).
    - "tz": the trapezoid rule on the ends (coarse) and the composite trapezoid rule on both halves (fine); the
      interval keeps its three gradients, so a split evaluates only the two new midpoints. kept: (f(a), f(b)), or
      None when the ends are still to be evaluated (a kinky Gauss-Kronrod interval's halves, and the first grid of
      riemann_trapezoid: n_steps - 1 equal cells, None: one).
    """

    MID = (np.array([0.5]), np.ones((1, 1)))
    ENDS = (np.array([0.0, 0.5, 1.0]), np.eye(3))

    def __init__(self, method, n_steps):
        self.trapezoid = method == "riemann_trapezoid"
        if self.trapezoid:
            grid = np.linspace(0.0, 1.0, 2 * (n_steps or 2) - 1)
            self.first = (grid, np.eye(len(grid)))
        else:
            self.first = pair(method, n_steps if n_steps is not None else SUB_STEPS[method])
            self.sub = pair(method, SUB_STEPS[method])

    def initial(self, batch):
        return [("tz" if self.trapezoid else "gk", e, 0.0, 1.0, "first") for e in range(batch)]

    def job(self, item):
        kind, e, a, b, kept = item
        if kept == "first":
            return e, a, b, self.first
        if kind == "gk":
            return e, a, b, self.sub
        return e, a, b, self.ENDS if kept is None else self.MID

    def complete(self, item, sums, dtype):
        kind, e, a, b, kept = item
        if kind == "gk":
            fine, coarse = ([t.to(dtype) for t in s] for s in sums)
            # The first interval's rule differs from its children's: their errors are not compared with its own.
            first = kept == "first"
            return [_Interval(e, a, b, fine, [f - c for f, c in zip(fine, coarse)], "gk0" if first else "gk",
                              None if first else kept)]
        # The job's results are (b - a) times the gradients.
        grads = [[g.to(dtype) / (b - a) for g in node] for node in sums]
        if kept is None or kept == "first":
            grid = np.linspace(a, b, len(grads))
            return [self._trapezoid(e, grid[k], grid[k + 2], grads[k], grads[k + 1], grads[k + 2])
                    for k in range(0, len(grads) - 1, 2)]
        return [self._trapezoid(e, a, b, kept[0], grads[0], kept[1])]

    @staticmethod
    def _trapezoid(e, a, b, fa, fm, fb):
        q = 0.25 * (b - a)
        value = [q * (x + 2 * m + y) for x, m, y in zip(fa, fm, fb)]
        gap = [q * (2 * m - x - y) for x, m, y in zip(fa, fm, fb)]
        return _Interval(e, a, b, value, gap, "tz", (fa, fm, fb))

    def children(self, iv):
        mid = 0.5 * (iv.a + iv.b)
        if iv.kind == "tz":
            fa, fm, fb = iv.kept
            return [("tz", iv.e, iv.a, mid, (fa, fm)), ("tz", iv.e, mid, iv.b, (fm, fb))]
        if self._kinky(iv):
            return [("tz", iv.e, iv.a, mid, None), ("tz", iv.e, mid, iv.b, None)]
        parent = None if iv.kind == "gk0" else iv.err
        return [("gk", iv.e, iv.a, mid, parent), ("gk", iv.e, mid, iv.b, parent)]

    @staticmethod
    def _kinky(iv):
        return iv.kind == "gk" and iv.kept is not None and iv.err > KINK_SHARE * iv.kept

    def split_cost(self, iv):
        """Gradients the children of iv will cost."""
        if iv.kind == "tz":
            return 2
        if self._kinky(iv):
            return 2 * len(self.ENDS[0])
        return 2 * len(self.sub[0])


def run(problem, diff, *, method, n_steps, internal_batch_size, multiply_by_inputs, rtol, atol, max_steps, backend,
        bar):
    """(attributions tuple, per-example sums)."""
    inputs, baselines = problem.inputs, problem.baselines
    batch = inputs[0].shape[0]
    rtol = 0.0 if rtol is None else float(rtol)
    dtype = driver.widest_dtype(inputs)
    scheme = _Scheme(method, n_steps)
    # The factor that turns an integral into an attribution, and the path's direction (for completeness).
    direction = [(x.to(dtype) - b.to(dtype)) for x, b in zip(inputs, baselines)]
    factor = direction if multiply_by_inputs else [None] * len(inputs)
    max_rows = driver.chunk_rows(inputs, internal_batch_size)
    if internal_batch_size is not None:
        driver.warn_small_batch(internal_batch_size, batch)

    intervals = [[] for _ in range(batch)]
    totals = [[torch.zeros_like(d[e:e + 1]) for d in direction] for e in range(batch)]
    gaps = [[torch.zeros_like(d[e:e + 1]) for d in direction] for e in range(batch)]
    nodes = [0] * batch
    todo = scheme.initial(batch)
    failed = []
    while todo:
        jobs = [scheme.job(item) for item in todo]
        bar.update(0, extra_total=sum(len(j[3][0]) for j in jobs))
        sums = driver.weighted_sums(problem, jobs, max_rows=max_rows, backend=backend, bar=bar)
        touched = set()
        for item, job, result in zip(todo, jobs, sums):
            for iv in scheme.complete(item, result, dtype):
                e = iv.e
                iv.err = _norm(_scaled(iv.gap, factor, e))
                intervals[e].append(iv)
                totals[e] = [t + v for t, v in zip(totals[e], iv.value)]
                gaps[e] = [t + g for t, g in zip(gaps[e], iv.gap)]
            nodes[job[0]] += len(job[3][0])
            touched.add(job[0])
        todo = []
        for e in sorted(touched):
            complete = sum(float((t * d[e:e + 1]).sum()) for t, d in zip(totals[e], direction))
            # One tolerance for both checks: relative to the attributions' norm (relative to |F(x) - F(x')|, a path
            # along which F changes little would be driven far below the per-feature accuracy asked for).
            tol = max(rtol * _norm(_scaled(totals[e], factor, e)), atol)
            # The error estimate: the composite fine rule minus the composite coarse rule over all subintervals,
            # as attributions, measured as a norm over every feature of every input.
            est = _norm(_scaled(gaps[e], factor, e))
            complete_err = abs(complete - float(diff[e]))
            if est <= tol and complete_err <= tol:
                continue
            ranked = sorted(intervals[e], key=lambda iv: iv.err, reverse=True)
            if nodes[e] + scheme.split_cost(ranked[0]) > max_steps:
                failed.append(e)
                continue
            # Split the worst subintervals, as many as carry the share max(1 - tol / est, MIN_SHARE) of the
            # subintervals' error norms (at least one); they all go through the model in the same round. The floor
            # keeps the number of rounds logarithmic (without it, the last rounds split one subinterval each and
            # the model sees batches of a few rows).
            share = max(1.0 - tol / est, MIN_SHARE) if est > 0 else 0.0
            target, chosen, covered, spent = share * sum(iv.err for iv in ranked), [], 0.0, nodes[e]
            for iv in ranked:
                cost = scheme.split_cost(iv)
                if chosen and (covered >= target or spent + cost > max_steps):
                    break
                chosen.append(iv)
                covered += iv.err
                spent += cost
            for iv in chosen:
                intervals[e].remove(iv)
                totals[e] = [t - v for t, v in zip(totals[e], iv.value)]
                gaps[e] = [t - g for t, g in zip(gaps[e], iv.gap)]
                todo += scheme.children(iv)
    if failed:
        warnings.warn(f"integrated_gradients: examples {sorted(failed)} did not reach rtol={rtol}, atol={atol} "
                      f"within max_steps={max_steps} nodes per example (method={method!r})", stacklevel=4)
    return driver.finish(problem, totals, multiply_by_inputs)


def _scaled(parts, factor, e):
    return [p if m is None else p * m[e:e + 1] for p, m in zip(parts, factor)]


def _norm(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))

"""Quadrature rules on [0, 1] for the path integral, and the nested sequences adaptive mode refines through.

Everything is computed in float64 (numpy); the driver casts nodes and weights to float32, or keeps float64 for
float64 inputs. README.md beside this file has the maths.
"""
import functools

import numpy as np
from numpy.polynomial import legendre

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def check_method(method, n_steps):
    """method is one of METHODS; n_steps an integer >= 1 (None: chosen by the caller)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS + ('exact',)}, got {method!r}")
    if n_steps is None:
        return
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if method == "riemann_trapezoid" and n_steps < 2:
        raise ValueError(f"n_steps must be >= 2 for riemann_trapezoid (it uses both end points), got {n_steps}")


@functools.lru_cache(maxsize=256)
def rule(method, n):
    """(alphas [n], weights [n]) of `method` with n nodes on [0, 1], float64 numpy arrays (read-only)."""
    check_method(method, n)
    k = np.arange(n, dtype=np.float64)
    if method == "gausslegendre":
        x, w = legendre.leggauss(n)
        alphas, weights = 0.5 * (x + 1.0), 0.5 * w
    elif method == "riemann_trapezoid":
        # The composite trapezoid rule on n - 1 equal intervals: its weights sum to 1 (Captum's to 1 - 1/n).
        alphas = k / (n - 1)
        weights = np.full(n, 1.0 / (n - 1))
        weights[0] = weights[-1] = 0.5 / (n - 1)
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        alphas, weights = (k + offset) / n, np.full(n, 1.0 / n)
    alphas.setflags(write=False)
    weights.setflags(write=False)
    return alphas, weights


def _riemann_size(method, n, level):
    """Node count of level `level` of a nested Riemann sequence starting from n nodes."""
    if method == "riemann_middle":
        return n * 3**level  # midpoints nest when every interval is split in three
    if method == "riemann_trapezoid":
        return (n - 1) * 2**level + 1
    return n * 2**level


def _extension(nodes):
    """The n + 1 nodes that extend the n given nodes on [-1, 1] to the interpolatory rule of highest degree:
    the roots of the polynomial of degree n + 1 orthogonal to every polynomial of degree <= n under the weight
    prod(x - nodes). For Gauss-Legendre nodes this is the Kronrod extension; applied again it is Patterson's.
    Returns None when the extension does not exist with real, simple, interior nodes."""
    n = len(nodes)
    m = n + 1
    # Exact Gauss-Legendre quadrature of polynomials of degree n + m + n.
    qx, qw = legendre.leggauss((3 * n + 3) // 2 + 1)
    # The node polynomial, scaled by 2 per factor so that it neither underflows nor overflows.
    omega = np.prod(2.0 * (qx[:, None] - nodes[None, :]), axis=1)
    basis = legendre.legvander(qx, m)  # [q, m + 1]: P_0 .. P_m
    gram = (basis[:, : m].T * (qw * omega)) @ basis  # [m, m + 1]: integral of omega P_k P_j
    coef = np.linalg.solve(gram[:, :m], -gram[:, m])
    poly = np.append(coef, 1.0)
    roots = legendre.legroots(poly)
    if np.iscomplexobj(roots):
        if np.abs(roots.imag).max() > 1e-8:
            return None
        roots = roots.real
    deriv = legendre.legder(poly)
    for _ in range(3):  # Newton polish of the eigenvalue roots
        roots = roots - legendre.legval(roots, poly) / legendre.legval(roots, deriv)
    roots = np.sort(roots)
    if roots.min() <= -1.0 or roots.max() >= 1.0 or np.diff(roots).min() < 1e-10:
        return None
    if np.abs(roots[:, None] - nodes[None, :]).min() < 1e-10:
        return None
    return roots


def _interpolatory_weights(nodes):
    """Weights on [-1, 1] of the interpolatory rule on `nodes` (exact for degree len(nodes) - 1), or None when
    they are not all positive (then the rule is not worth using)."""
    vander = legendre.legvander(nodes, len(nodes) - 1)  # [n, n]
    moments = np.zeros(len(nodes))
    moments[0] = 2.0
    weights = np.linalg.solve(vander.T, moments)
    if weights.min() <= 0.0 or abs(weights.sum() - 2.0) > 1e-12:
        return None
    return weights


@functools.lru_cache(maxsize=64)
def nested_levels(method, n, max_steps):
    """The rules adaptive mode refines through: a list of (new_alphas, weights), level 0 being `method` with n
    nodes. Level k adds new_alphas to the nodes of the levels before it; `weights` covers every node of levels
    0..k in that order (the new ones last) and sums to 1. Levels stop before the node count passes max_steps.

    gausslegendre: Gauss-Legendre, then its Kronrod extension (2n + 1 nodes), then Patterson extensions
    (4n + 3, ...) while they exist with real interior nodes and positive weights. Riemann rules: the same rule on
    finer grids that contain the coarser one (left/right/trapezoid halve the spacing, middle divides it by 3).
    """
    alphas, weights = rule(method, n)
    levels = [(np.array(alphas), np.array(weights))]
    if method == "gausslegendre":
        nodes = 2.0 * alphas - 1.0
        while 2 * len(nodes) + 1 <= max_steps:
            new = _extension(nodes)
            if new is None:
                break
            full = np.concatenate([nodes, new])
            w = _interpolatory_weights(full)
            if w is None:
                break
            levels.append((0.5 * (new + 1.0), 0.5 * w))
            nodes = full
        return levels
    seen = np.array(alphas)
    level = 1
    while _riemann_size(method, n, level) <= max_steps:
        a, w = rule(method, _riemann_size(method, n, level))
        # Order the finer rule's nodes as earlier levels first, then the new ones.
        old_idx = np.clip(np.searchsorted(a, seen - 1e-12), 0, a.size - 1)
        new_mask = np.ones(a.size, dtype=bool)
        new_mask[old_idx] = False
        order = np.concatenate([old_idx, np.nonzero(new_mask)[0]])
        levels.append((a[new_mask], w[order]))
        seen = np.concatenate([seen, a[new_mask]])
        level += 1
    return levels


def nested_pair(method, n):
    """The first two rules of nested_levels: ((alphas [n], weights [n]) of `method`, (new_alphas, weights over
    all nodes, the new ones last)) of its first extension. ValueError if the extension does not exist."""
    size = 2 * n + 1 if method == "gausslegendre" else _riemann_size(method, n, 1)
    levels = nested_levels(method, n, size)
    if len(levels) < 2:
        raise ValueError(f"n_steps={n}: method={method!r} has no nested extension to estimate its error with")
    return levels[0], levels[1]

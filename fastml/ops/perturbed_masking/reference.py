"""Perturbed Masking's distance in plain PyTorch: the definition the kernels are checked against.

`distance` is the kernel op's semantics (fastml/ops/perturbed_masking/schema.py); `word_vector` and `metric_fn`
are the pieces the straightforward implementation of the paper's loop is written with.
"""
import torch

from fastml._numerics import acc_dtype
from fastml.ops.perturbed_masking.schema import COSINE_EPS


def metric_fn(a, v, metric):
    """d(a, v) over the last dim, in the dtype of a and v: ||a - v|| or 1 - cos(a, v)."""
    if metric == "euclidean":
        return (a - v).pow(2).sum(-1).sqrt()
    dot = (a * v).sum(-1)
    norms = a.pow(2).sum(-1).sqrt() * v.pow(2).sum(-1).sqrt()
    return 1 - dot / norms.clamp_min(COSINE_EPS)


def word_vector(states, start, end):
    """Mean of states[..., start:end, :] over the tokens, in the accumulation dtype."""
    return states[..., start:end, :].to(acc_dtype(states.dtype)).mean(-2)


def distance(states, rows, starts, ends, anchors, anchor_index, metric):
    """dist[m] = d(anchors[anchor_index[m]], mean(states[rows[m], starts[m]:ends[m]])), in the accumulation dtype.

    Vectorised: the span mean is a masked sum over the T positions of each selected row."""
    acc = acc_dtype(states.dtype)
    T = states.shape[1]
    pos = torch.arange(T, device=states.device)
    inside = (pos[None, :] >= starts[:, None]) & (pos[None, :] < ends[:, None])  # [M, T]
    weights = inside.to(acc) / (ends - starts).to(acc)[:, None]
    v = torch.einsum("mt,mtd->md", weights, states[rows].to(acc))
    a = anchors[anchor_index].to(acc)
    return metric_fn(a, v, metric)

"""The kernel op of Perturbed Masking, declared once for the C++ kernel (fastml::perturbed_masking_distance) and its
Triton twin (fastml::perturbed_masking_distance_triton).

perturbed_masking_distance(states, rows, starts, ends, anchors, anchor_index, metric) -> dist [M]

- states [R, T, D]: one layer's hidden states of R masked sentences (contiguous, floating);
- rows, starts, ends, anchor_index [M] int64 (contiguous, on states' device): output m reads the word vector
  v_m = mean(states[rows[m], starts[m]:ends[m], :]) (a half-open, non-empty token span) and compares it with the
  anchor a_m = anchors[anchor_index[m]], anchors [W, D] of states' dtype;
- metric "euclidean": dist[m] = ||a_m - v_m||_2; "cosine": dist[m] = 1 - a_m.v_m / max(||a_m|| ||v_m||, 1e-8).

dist is in the accumulation dtype (float32; float64 for float64 states), and every sum is accumulated in it: the
word vector is gathered and reduced on the fly, never written out.
"""
import torch

from fastml._backend import ALL_FLOATS
from fastml._library import OpSchema, declare
from fastml._numerics import acc_dtype

FLOATS = ALL_FLOATS
METRICS = ("euclidean", "cosine")
COSINE_EPS = 1e-8


def check_distance(states, rows, starts, ends, anchors, anchor_index, metric):
    if not isinstance(states, torch.Tensor) or states.dtype not in FLOATS:
        raise TypeError(f"states must be a floating tensor, got "
                        f"{states.dtype if isinstance(states, torch.Tensor) else type(states).__name__}")
    if states.dim() != 3 or not states.is_contiguous():
        raise ValueError(f"states must be a contiguous [R, T, D] tensor, got shape {list(states.shape)}")
    R, T, D = states.shape
    if not isinstance(anchors, torch.Tensor) or anchors.dtype != states.dtype or anchors.device != states.device:
        raise TypeError("anchors must be a tensor of states' dtype and device")
    if anchors.dim() != 2 or anchors.shape[1] != D or not anchors.is_contiguous():
        raise ValueError(f"anchors must be a contiguous [W, {D}] tensor, got shape {list(anchors.shape)}")
    M = None
    for t, name in ((rows, "rows"), (starts, "starts"), (ends, "ends"), (anchor_index, "anchor_index")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.device != states.device:
            raise TypeError(f"{name} must be an int64 tensor on states' device")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {list(t.shape)}")
        if M is None:
            M = t.shape[0]
        elif t.shape[0] != M:
            raise ValueError(f"{name} has {t.shape[0]} entries, rows has {M}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if M:
        if int(rows.min()) < 0 or int(rows.max()) >= R:
            raise ValueError(f"rows must lie in [0, {R})")
        if int(starts.min()) < 0 or int(ends.max()) > T or bool((ends <= starts).any()):
            raise ValueError(f"every span [starts, ends) must be non-empty and lie in [0, {T}]")
        if int(anchor_index.min()) < 0 or int(anchor_index.max()) >= anchors.shape[0]:
            raise ValueError(f"anchor_index must lie in [0, {anchors.shape[0]})")


def _distance(states, rows, starts, ends, anchors, anchor_index, metric):
    return states.new_empty((rows.shape[0],), dtype=acc_dtype(states.dtype))


DISTANCE = OpSchema("perturbed_masking_distance", "(Tensor states, Tensor rows, Tensor starts, Tensor ends, "
                    "Tensor anchors, Tensor anchor_index, str metric) -> Tensor", _distance, check=check_distance)
declare(DISTANCE)

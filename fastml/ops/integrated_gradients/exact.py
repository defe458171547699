"""Exact IG for models that are piecewise linear along the path (README.md, "method='exact'").

Along z(a) = x' + a (x - x') such a model is linear on segments [a_k, a_k+1] whose ends are the values of `a` at
which some ReLU-like input changes sign or some max-pool window changes its winner. The gradient is constant on a
segment, so IG = (x - x') * sum_k (a_k+1 - a_k) * grad(midpoint_k), exactly up to rounding.

The walk: from a_k, one model call on two rows per example, z(a_k) and z(a_k) + (x - x'), under a
TorchDispatchMode that sees every aten op. The mode follows which tensors depend on the path (tainted: computed
from the path rows); untainted work runs untouched (a text model's embedding lookup, say). On tainted tensors:
linear ops run as they are, piecewise-linear ops are *frozen* to the piece they are in just after a_k (the same
piece for both rows), and anything else raises ValueError. The frozen network is affine in its input, so for every
frozen op's input u the difference of the two rows is exactly du/da, and u(a) = u(a_k) + (a - a_k) du on the whole
segment. The segment ends at the smallest a > a_k at which any frozen op's input reaches a breakpoint of its piece
(a ReLU's 0, a hardtanh's bounds, a max-pool candidate overtaking the window's winner), over all ops, or at 1.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from fastml.ops.integrated_gradients import driver

# Linear in every tainted operand (any number of them): rearrangements, sums, averages, padding, copies.
LINEAR = frozenset("""
view _unsafe_view reshape _reshape_alias permute transpose t expand clone contiguous cat stack slice select squeeze
unsqueeze flatten unflatten split split_with_sizes chunk unbind narrow index_select gather index detach alias
_to_copy copy_ copy repeat roll flip constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d
replication_pad1d replication_pad2d replication_pad3d as_strided lift_fresh lift_fresh_copy expand_copy view_copy
permute_copy slice_copy select_copy t_copy transpose_copy unsqueeze_copy squeeze_copy pixel_shuffle pixel_unshuffle
channel_shuffle movedim im2col col2im upsample_nearest1d upsample_nearest2d upsample_bilinear2d embedding
add add_ sub sub_ rsub neg neg_ sum mean avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
_adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool3d cumsum fill_ zero_
""".split())
# Ops whose result does not depend on the values of their tensor operands (no taint passes through them).
UNTAINTED = frozenset("empty_like zeros_like ones_like full_like new_empty new_zeros new_ones new_full rand_like "
                      "randn_like empty_strided".split())
# Linear when the listed operands do not depend on the path: (operands that may not all be tainted together,
# operands that must not be tainted at all).
BILINEAR = {
    "mul": ((0, 1), ()), "mul_": ((0, 1), ()), "div": ((), (1,)), "div_": ((), (1,)),
    "mm": ((0, 1), ()), "bmm": ((0, 1), ()), "matmul": ((0, 1), ()), "mv": ((0, 1), ()), "dot": ((0, 1), ()),
    "addmm": ((1, 2), ()), "addmm_": ((1, 2), ()), "addbmm": ((1, 2), ()), "baddbmm": ((1, 2), ()),
    "addmv": ((1, 2), ()), "linear": ((), (1, 2)), "convolution": ((), (1, 2)), "_convolution": ((), (1, 2)),
    "where": ((), (0,)), "masked_fill": ((), (1,)), "masked_fill_": ((), (1,)),
    "_native_batch_norm_legit_no_training": ((), (1, 2, 3, 4)),
    "native_batch_norm": ((), (1, 2, 3, 4)), "_native_batch_norm_legit": ((), (1, 2, 3, 4)),
}
# Elementwise piecewise-linear functions: (breakpoints, slopes and constants of the pieces between them), from the
# op's scalar arguments.
_INF = float("inf")


def _clamp_pieces(lo, hi):
    points, slopes, consts = [], [1.0], [0.0]
    if lo is not None:
        points, slopes, consts = [lo], [0.0, 1.0], [lo, 0.0]
    if hi is not None:
        points, slopes, consts = points + [hi], slopes + [0.0], consts + [hi]
    return points, slopes, consts


ELEMENTWISE = {
    "relu": lambda a: ([0.0], [0.0, 1.0], [0.0, 0.0]),
    "leaky_relu": lambda a: ([0.0], [a[1] if len(a) > 1 else 0.01, 1.0], [0.0, 0.0]),
    "hardtanh": lambda a: _clamp_pieces(a[1] if len(a) > 1 else -1.0, a[2] if len(a) > 2 else 1.0),
    "clamp": lambda a: _clamp_pieces(a[1] if len(a) > 1 else None, a[2] if len(a) > 2 else None),
    "clamp_min": lambda a: _clamp_pieces(a[1], None),
    "clamp_max": lambda a: _clamp_pieces(None, a[1]),
    "abs": lambda a: ([0.0], [-1.0, 1.0], [0.0, 0.0]),
}
TWO_WAY = {"maximum": True, "minimum": False, "max": True, "min": False}  # the two-tensor overloads only
MAX_POOL = frozenset(["max_pool2d_with_indices", "max_pool2d"])
MIDPOINT = (np.array([0.5]), np.ones((1, 1)))


def _refuse(func, why):
    return ValueError(f"method='exact': {func._schema.name} {why}; exact IG needs a model that is piecewise linear "
                      "along the path (ReLU-like activations, max pooling, linear layers, batch norm in eval mode)")


class _Walk(TorchDispatchMode):
    """One step of the walk: n examples, rows [z(a_k) of each example; z(a_k) + (x - x') of each example].
    After the forward, `tau` [n] holds each example's distance from a_k to its next breakpoint (inf if none)."""

    def __init__(self, n, delta):
        super().__init__()
        self.n = n
        self.delta = delta
        self.tau = torch.full((n,), _INF, dtype=torch.float64)
        self.tainted = WeakIdKeyDictionary()

    def taint(self, t):
        self.tainted[t] = True

    def _is_tainted(self, x):
        return isinstance(x, torch.Tensor) and x in self.tainted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if not any(self._is_tainted(t) for t in flat):
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name in UNTAINTED:
            return func(*args, **kwargs)
        args = _positional(func, args, kwargs)
        if name in LINEAR:
            out = func(*args)
        elif name in BILINEAR:
            together, never = BILINEAR[name]
            if together and all(self._is_tainted(args[i]) for i in together if i < len(args)):
                raise _refuse(func, "multiplies two tensors that both depend on the path (not linear)")
            for i in never:
                if i < len(args) and self._is_tainted(args[i]):
                    raise _refuse(func, f"takes its argument {func._schema.arguments[i].name} from the path "
                                        "(only its other operands may depend on it)")
            if "batch_norm" in name and name != "_native_batch_norm_legit_no_training" and args[5]:
                raise _refuse(func, "runs in training mode (batch statistics mix the examples); call model.eval()")
            out = func(*args)
        elif name.rstrip("_") in ELEMENTWISE and len(args) >= 1 and self._is_tainted(args[0]) and not any(
                self._is_tainted(a) for a in args[1:]):
            out = self._elementwise(func, name, args)
        elif name in TWO_WAY and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            out = self._two_way(func, TWO_WAY[name], args)
        elif name in MAX_POOL and self._is_tainted(args[0]):
            out = self._max_pool(func, name, args)
        else:
            raise _refuse(func, "is not piecewise linear (or not supported) on a tensor that depends on the path")
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.taint(t)
        return out

    # --- helpers -----------------------------------------------------------------------------------------------
    def _halves(self, func, u):
        if u.dim() < 1 or u.shape[0] != 2 * self.n:
            raise _refuse(func, f"got a path tensor of shape {list(u.shape)} without the rows as its first dim")
        return u[: self.n], u[self.n:]

    def _crossings(self, u0, du, points):
        """Piece index of each element just after a_k, and the per-example distance to the next breakpoint."""
        delta = self.delta
        ahead = u0 + delta * du
        piece = torch.zeros(u0.shape, dtype=torch.long, device=u0.device)
        for p in points:
            piece += (ahead > p).long()
            with torch.no_grad():
                tau = (p - u0.double()) / du.double()
            tau = torch.where((du != 0) & (tau > delta), tau, torch.full_like(tau, _INF))
            self._record(tau)
        return piece

    def _record(self, tau):
        if tau.numel():
            self.tau = torch.minimum(self.tau, tau.reshape(self.n, -1).amin(1).cpu())

    def _elementwise(self, func, name, args):
        u = args[0]
        scalars = []
        for a in args:
            if isinstance(a, torch.Tensor) and a is not u:
                if a.numel() != 1:
                    raise _refuse(func, "has tensor bounds; exact IG handles scalar bounds")
                a = a.item()
            scalars.append(a)
        points, slopes, consts = ELEMENTWISE[name.rstrip("_")](scalars)
        u0, u1 = self._halves(func, u)
        piece = self._crossings(u0, u1 - u0, points)
        slope = torch.tensor(slopes, dtype=u.dtype, device=u.device)[piece]
        const = torch.tensor(consts, dtype=u.dtype, device=u.device)[piece]
        out = torch.cat([slope, slope]) * u + torch.cat([const, const])
        if name.endswith("_"):
            return u.copy_(out)
        return out

    def _two_way(self, func, is_max, args):
        a, b = torch.broadcast_tensors(*args)
        a0, a1 = self._halves(func, a)
        b0, b1 = self._halves(func, b)
        piece = self._crossings(a0 - b0, (a1 - b1) - (a0 - b0), [0.0]).bool()
        take_a = piece if is_max else ~piece
        return torch.where(torch.cat([take_a, take_a]), a, b)

    def _max_pool(self, func, name, args):
        u, kernel = args[0], list(args[1])
        stride = list(args[2]) if len(args) > 2 and len(args[2]) else kernel
        padding = list(args[3]) if len(args) > 3 else [0]
        dilation = list(args[4]) if len(args) > 4 else [1]
        kernel, stride, padding, dilation = (v * 2 if len(v) == 1 else v for v in (kernel, stride, padding, dilation))
        if u.dim() != 4:
            raise _refuse(func, f"got an input of shape {list(u.shape)}; exact IG handles [N, C, H, W]")
        ref = func(*args)
        ref = ref[0] if isinstance(ref, tuple) else ref
        ho, wo = ref.shape[-2:]
        h, w = u.shape[-2:]
        need = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip((ho, wo), stride, dilation, kernel)]
        right = [max(0, nd - size - p) for nd, size, p in zip(need, (h, w), padding)]
        pad = (padding[1], right[1], padding[0], right[0])

        def windows(t, fill):
            t = F.pad(t, pad, value=fill)
            cols = F.unfold(t.reshape(-1, 1, *t.shape[-2:]), kernel, dilation=dilation, stride=stride)
            hu = (t.shape[-2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
            wu = (t.shape[-1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
            cols = cols.reshape(*t.shape[:-2], kernel[0] * kernel[1], hu, wu)
            return cols[..., :ho, :wo]

        cand = windows(u, -_INF)  # [2n, C, K, ho, wo]
        c0, c1 = cand[: self.n], cand[self.n:]
        outside = torch.isinf(c0)
        dc = torch.where(outside, torch.zeros_like(c0), c1 - c0)
        winner = (c0 + self.delta * dc).argmax(2, keepdim=True)
        w0, dw = c0.gather(2, winner), dc.gather(2, winner)
        with torch.no_grad():
            tau = (w0.double() - c0.double()) / (dc.double() - dw.double())
        tau = torch.where(~outside & (dc > dw) & (tau > self.delta), tau, torch.full_like(tau, _INF))
        self._record(tau)
        both = torch.cat([winner, winner])
        out = cand.gather(2, both).squeeze(2)
        if name == "max_pool2d":
            return out
        pos = torch.arange(h * w, dtype=torch.float64, device=u.device).reshape(1, 1, h, w)
        index = windows(pos, -1.0).expand(u.shape[0], u.shape[1], -1, -1, -1).gather(2, both).squeeze(2)
        return out, index.long()


def _positional(func, args, kwargs):
    """args with the keyword arguments of the schema moved into their positions (defaults filled in between)."""
    if not kwargs:
        return list(args)
    out = list(args)
    for i, arg in enumerate(func._schema.arguments[len(args):], start=len(args)):
        if arg.name in kwargs:
            out.append(kwargs[arg.name])
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            break
    return out


def walk(problem, *, max_segments, max_rows, bar):
    """Per example, the sorted segment ends 0 = a_0 < a_1 < ... < a_S = 1 (numpy float64)."""
    inputs, baselines = problem.inputs, problem.baselines
    batch = inputs[0].shape[0]
    dtype = driver.widest_dtype(inputs)
    delta = float(torch.finfo(dtype).eps) ** (2.0 / 3.0)
    direction = [x.to(dtype) - b.to(dtype) for x, b in zip(inputs, baselines)]
    alpha = np.zeros(batch)
    ends = [[0.0] for _ in range(batch)]
    active = list(range(batch))
    per_call = max(1, max_rows // 2)
    while active:
        for start in range(0, len(active), per_call):
            group = active[start: start + per_call]
            idx = torch.as_tensor(group, device=inputs[0].device)
            a = torch.as_tensor(alpha[group], dtype=dtype, device=inputs[0].device)
            points = []
            for x, b, d in zip(inputs, baselines, direction):
                ad = a.view(-1, *([1] * (x.dim() - 1)))
                p0 = b.to(dtype)[idx] + ad * d[idx]
                points.append(torch.cat([p0, p0 + d[idx]]).to(x.dtype))
            mode = _Walk(len(group), delta)
            with torch.no_grad(), mode:
                for p in points:
                    mode.taint(p)
                problem.forward(tuple(points), group + group)
            bar.update(2 * len(group), extra_total=2 * len(group))
            for e, tau in zip(group, mode.tau.tolist()):
                nxt = alpha[e] + tau
                nxt = 1.0 if nxt >= 1.0 - delta else nxt
                alpha[e] = nxt
                ends[e].append(nxt)
                if len(ends[e]) - 1 >= max_segments and nxt < 1.0:
                    raise ValueError(f"method='exact': example {e} has more than max_segments={max_segments} linear "
                                     f"segments along its path (it reached alpha={nxt:.6g}); raise max_segments or "
                                     "use a quadrature method")
        active = [e for e in active if alpha[e] < 1.0]
    return [np.array(e) for e in ends]


def run(problem, *, internal_batch_size, multiply_by_inputs, max_segments, backend, bar):
    """(attributions tuple, per-example sums)."""
    max_rows = driver.chunk_rows(problem.inputs, internal_batch_size)
    ends = walk(problem, max_segments=max_segments, max_rows=max_rows, bar=bar)
    # One job per segment: its midpoint's gradient times its length.
    jobs = [(e, a0, a1, MIDPOINT) for e, a in enumerate(ends) for a0, a1 in zip(a[:-1].tolist(), a[1:].tolist())]
    bar.update(0, extra_total=len(jobs))
    sums = driver.weighted_sums(problem, jobs, max_rows=max_rows, backend=backend, bar=bar)
    totals = [None] * len(ends)
    for (e, _, _, _), (s,) in zip(jobs, sums):
        totals[e] = s if totals[e] is None else tuple(t + v for t, v in zip(totals[e], s))
    return driver.finish(problem, totals, multiply_by_inputs)

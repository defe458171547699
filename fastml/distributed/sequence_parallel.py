"""Sequence-parallel causal linear attention: one sequence split over the ranks of a torch.distributed group.

Rank r holds tokens [t_r, t_{r+1}) of the sequence. With k' = phi(k), its slice adds
    c_r = (sum_s k'_s v_s^T, sum_s k'_s)        ([B, H, K, V] and [B, H, K]; rank 0 also adds the initial state)
to the state, so rank r starts from the exclusive prefix P_r = c_0 + ... + c_{r-1} (the initial state on rank 0)
and the whole sequence ends at c_0 + ... + c_{R-1}. Each rank computes c_r in one pass over its slice, the ranks
all-gather the c's (one collective, B*H*K*(V+1) numbers per rank whatever the length), and each rank runs the
slice's kernels from P_r. In the backward each rank first computes the gradient of its outputs with respect to
P_r, which needs no scan (sum_t q'_t dn_t^T, sum_t q'_t dd_t); the ranks all-gather those (and the final state's
gradients), and rank r's c_r receives the sum of the later ranks' (and every rank's final-state gradient). That
sum is the gradient of the slice's own final state P_r + c_r, so the slice's backward kernels take it as such and
carry it into k and v with no extra pass. README.md has the details.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastml import _backend
from fastml._numerics import acc_dtype
from fastml.distributed._agree import bits_float, exchange_records, float_bits
from fastml.ops import linear_attention as _la
from fastml.ops.linear_attention import LinearAttentionState
from fastml.ops.linear_attention._validate import (
    FLOAT_DTYPES,
    check_feature_map,
    check_qkv,
    check_scalars,
    check_state,
)

# Bytes this process handed to the state exchanges (forward and backward), and how many exchanges: read by the
# benchmark. A ring all-gather over R ranks sends each rank's buffer to R - 1 peers.
STATS = {"exchanges": 0, "state_bytes_sent": 0, "check_bytes_sent": 0}

_MAP_CODES = {None: 0, "elu+1": 1, "relu": 2}
_MAP_NAMES = {0: "None", 1: "'elu+1'", 2: "'relu'", 3: "a callable"}
_DEVICE_TYPES = {"cpu": 0, "cuda": 1}
# The record each rank contributes to the agreement: field names, in order.
_FIELDS = ("dtype", "device", "B", "H", "K", "V", "T", "initial_state", "normalize", "output_final_state", "eps",
           "scale", "feature_map", "grad_mode", "requires_grad")


def _resolve_group(group):
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group does not include this process (torch.distributed.get_rank(group) is -1)")
    return group


def _record_device(group):
    """Where the agreement's record lives: on the current CUDA device for an NCCL-only group, else on the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_checks(q, k, v, rank, group, feature_map, normalize, eps, scale, initial_state, output_final_state,
                  backend, unsupported):
    """Everything one rank can check alone. Returns (q, k, code, fields) with a callable map applied."""
    if unsupported:
        name = sorted(unsupported)[0]
        if name == "cu_seqlens":
            raise TypeError("cu_seqlens is not supported by the sequence-parallel op: it splits one sequence (per "
                            "batch entry) over the ranks; pack several sequences as a batch instead")
        raise TypeError(f"causal_linear_attention() got an unexpected keyword argument {name!r}")
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=True)
    eps, scale = check_scalars(normalize=normalize, eps=eps, scale=scale, output_final_state=output_final_state)
    if callable(feature_map):
        q, k, code = feature_map(q), feature_map(k), None
        check_qkv(q, k, v, causal=True, after_map=True)
    else:
        code = feature_map
    if dist.get_backend(group) == "nccl" and q.device.type != "cuda":
        raise ValueError(f"q is on {q.device} but the group's backend is nccl, which moves CUDA tensors only")
    if q.device.type not in _DEVICE_TYPES:
        raise ValueError(f"q is on {q.device}; the sequence-parallel op runs on CPU or CUDA tensors")
    B, H, T, K = q.shape
    V = v.shape[-1]
    if initial_state is not None:
        if rank != 0:
            raise ValueError(f"initial_state must be None on every rank but the group's first (rank 0), which "
                             f"holds the start of the sequence; rank {rank} passed one")
        check_state(initial_state, "initial_state", (B, H, K, V), acc_dtype(q.dtype), q.device)
    # The backend is chosen now, so that a rank whose backend cannot serve the call fails with the others.
    impl = _backend.select(_la.OP, _backend.Call(q.device, q.dtype, {"cu_seqlens": False, "K": K, "V": V}),
                           backend).impl
    tensors = [q, k, v] + ([] if initial_state is None else list(initial_state))
    fields = [FLOAT_DTYPES.index(q.dtype), _DEVICE_TYPES[q.device.type], B, H, K, V, T,
              initial_state is not None, normalize, output_final_state, float_bits(eps), float_bits(scale),
              3 if callable(feature_map) else _MAP_CODES[feature_map], torch.is_grad_enabled(),
              any(t.requires_grad for t in tensors)]
    return q, k, code, fields, impl


def _agree(records):
    """The same checks on every rank, over every rank's record: raise on all ranks or on none."""
    rows = [dict(zip(_FIELDS, r)) for r in records]
    first = rows[0]

    def differ(name):
        return next((r for r, row in enumerate(rows) if row[name] != first[name]), None)

    r = differ("dtype")
    if r is not None:
        raise TypeError(f"q, k and v must have one dtype on every rank: {FLOAT_DTYPES[first['dtype']]} on rank 0, "
                        f"{FLOAT_DTYPES[rows[r]['dtype']]} on rank {r}")
    r = differ("device")
    if r is not None:
        raise ValueError("q, k and v must be on the same kind of device on every rank (all CPU or all CUDA); "
                         f"rank 0 and rank {r} differ")
    for name, what in (("B", "batch size B"), ("H", "number of heads H"), ("K", "key dim K (after the feature map)"),
                       ("V", "value dim V")):
        r = differ(name)
        if r is not None:
            raise ValueError(f"q, k, v must have the same {what} on every rank: {first[name]} on rank 0, "
                             f"{rows[r][name]} on rank {r}")
    for name in ("normalize", "output_final_state"):
        r = differ(name)
        if r is not None:
            raise ValueError(f"{name} must be the same on every rank: {bool(first[name])} on rank 0, "
                             f"{bool(rows[r][name])} on rank {r}")
    for name in ("eps", "scale"):
        r = differ(name)
        if r is not None:
            raise ValueError(f"{name} must be the same on every rank: {bits_float(first[name])} on rank 0, "
                             f"{bits_float(rows[r][name])} on rank {r}")
    r = differ("feature_map")
    if r is not None:
        raise ValueError(f"feature_map must be the same on every rank: {_MAP_NAMES[first['feature_map']]} on "
                         f"rank 0, {_MAP_NAMES[rows[r]['feature_map']]} on rank {r}")
    late = next((r for r, row in enumerate(rows) if r > 0 and row["initial_state"]), None)
    if late is not None:
        raise ValueError(f"initial_state must be None on every rank but the group's first; rank {late} passed one")
    r = differ("grad_mode")
    if r is not None:
        raise ValueError("grad mode must be the same on every rank (torch.no_grad() on all ranks or on none): the "
                         f"backward is collective; rank 0 has it {'on' if first['grad_mode'] else 'off'}, rank {r} "
                         f"{'on' if rows[r]['grad_mode'] else 'off'}")
    first = dict(first, needs_grad=bool(first["grad_mode"]) and any(row["requires_grad"] for row in rows))
    return first


class _Slice:
    """One rank's slice run from its start state, kept for the backward: o, den = q'.z_t + eps (None where not
    needed), the start (kv0, z0; None for zeros) and, for the reference backend, the autograd graph."""

    def __init__(self, o, den, kv0, z0, graph=None):
        self.o, self.den, self.kv0, self.z0, self.graph = o, den, kv0, z0, graph


def _run_slice(impl, q, k, v, start, code, opts, needs_grad, needs_den):
    """The slice's forward from `start` (None: zeros). A kernel backend runs its fwd op directly (which returns
    den); the reference runs under autograd (with detached leaves, so that the backward can feed its final state a
    gradient), with den computed here when the start gradient will need it."""
    args = (code, opts["normalize"], opts["eps"], opts["scale"])
    kv0, z0 = (None, None) if start is None else (start[0].contiguous(), start[1].contiguous())
    if impl.kernels is not None:
        o, _, _, den = impl.kernels[0](q, k, v, kv0, z0, None, *args)
        return _Slice(o, den, kv0, z0)
    if not needs_grad:
        with torch.no_grad():
            return _Slice(impl.causal(q, k, v, kv0, z0, None, *args)[0], None, kv0, z0)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        st = [None, None] if kv0 is None else [t.detach().requires_grad_() for t in (kv0, z0)]
        o, fkv, fz = impl.causal(*leaves, *st, None, *args)
    den = None
    if needs_den:
        with torch.no_grad():
            den = _reference_den(q, k, kv0, z0, code, opts, acc_dtype(q.dtype))
    return _Slice(o.detach(), den, kv0, z0, graph=((o, fkv, fz), leaves + st))


def _reference_den(q, k, kv0, z0, code, opts, sd):
    """den_t = q'_t . z_t + eps, z_t = z0 + sum_{s<=t} k'_s, in torch (for the reference backend)."""
    z = _phi(k, code, sd).cumsum(2)
    if z0 is not None:
        z = z + z0.unsqueeze(2)
    return (_phi(q, code, sd) * opts["scale"] * z).sum(-1) + opts["eps"]


def _start_grad(do, q, run, code, opts, fused):
    """The gradient of this slice's outputs with respect to its start state: (sum_t q'_t dn_t^T, sum_t q'_t dd_t)
    with dn = do / den, dd = -(do . o) / den (normalize; else dn = do and no z term). One C++ pass on the CPU
    (fastml::linear_attention_start_grad), torch elsewhere."""
    normalize, scale = opts["normalize"], opts["scale"]
    sd = acc_dtype(q.dtype)
    den = run.den
    if fused:  # a kernel backend: its forward returned den
        return torch.ops.fastml.linear_attention_start_grad(do, q, run.o, den, code, normalize, scale)
    qf = _phi(q, code, sd) * scale
    g = do.to(sd)
    if normalize:
        dz = torch.einsum("bhtk,bht->bhk", qf, -(g * run.o.to(sd)).sum(-1) / den)
        g = g / den.unsqueeze(-1)
    else:
        dz = qf.new_zeros(qf.shape[:2] + qf.shape[3:])
    return torch.einsum("bhtk,bhtv->bhkv", qf, g), dz


class _SequenceParallel(torch.autograd.Function):
    """One rank's part, given its contribution c_r: the all-gather of the contributions, then the slice from the
    prefix. Backward: the start gradient of the slice's outputs, the all-gather of those (and of the final
    state's gradients), then the slice's backward with the later ranks' sum as its final state's gradient."""

    @staticmethod
    def forward(ctx, q, k, v, kv0, z0, anchor, kv_c, z_c, group, impl, code, opts, with_total, needs_grad):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        shapes = (kv_c.shape, z_c.shape)
        flat = torch.cat([kv_c.reshape(-1), z_c.reshape(-1)])
        gathered = flat.new_empty(world, flat.numel())
        work = dist.all_gather_single(gathered.view(-1), flat, group=group, async_op=True)
        _count(flat, world)
        # Past the first rank the start gradient is needed, and with normalize it reads den.
        needs_den = needs_grad and rank > 0 and opts["normalize"]
        if rank == 0:
            # The first rank needs nothing from the others: its slice runs while the contributions travel.
            run = _run_slice(impl, q, k, v, None if kv0 is None else (kv0, z0), code, opts, needs_grad, needs_den)
            work.wait()
        else:
            work.wait()
            run = _run_slice(impl, q, k, v, _split(gathered[:rank].sum(0), shapes), code, opts, needs_grad,
                             needs_den)
        total = _split(gathered.sum(0), shapes)
        ctx.needs_grad = needs_grad
        if needs_grad:
            # o is also this function's output: saved through save_for_backward, never as an attribute (which
            # would tie the output and its graph into a reference cycle).
            ctx.save_for_backward(q, k, v, run.o, run.den, run.kv0, run.z0)
            ctx.graph = run.graph
            ctx.group, ctx.rank, ctx.world, ctx.shapes = group, rank, world, shapes
            ctx.impl, ctx.code, ctx.opts, ctx.with_total = impl, code, opts, with_total
        return run.o, total[0], total[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dtkv, dtz):
        if not ctx.needs_grad:
            raise RuntimeError("the sequence-parallel op ran without gradients (no rank's inputs required grad)")
        q, k, v, o, den, kv0, z0 = ctx.saved_tensors
        run = _Slice(o, den, kv0, z0, ctx.graph)
        do = do.contiguous()
        n = ctx.shapes[0].numel() + ctx.shapes[1].numel()
        kernels = ctx.impl.kernels
        # Rank 0's start is the initial state, not a prefix of other ranks' contributions: it sends zeros.
        if ctx.rank > 0:
            dP = _start_grad(do, q, run, ctx.code, ctx.opts, kernels is not None and _fused(q))
            parts = [torch.cat([dP[0].reshape(-1), dP[1].reshape(-1)])]
        else:
            parts = [do.new_zeros(n, dtype=dtkv.dtype)]
        if ctx.with_total:
            parts.append(torch.cat([dtkv.reshape(-1), dtz.reshape(-1)]))
        flat = torch.cat(parts)
        gathered = flat.new_empty(ctx.world, flat.numel())
        work = dist.all_gather_single(gathered.view(-1), flat, group=ctx.group, async_op=True)
        _count(flat, ctx.world)
        need = ctx.needs_input_grad
        opts = ctx.opts
        args = (ctx.code, opts["normalize"], opts["eps"], opts["scale"])
        # On the CPU the slice's backward runs as its two sweeps: dq needs nothing from the other ranks, so it runs
        # while their gradients travel (per (batch, head) unit: with fewer units than threads the one-call
        # backward, which can also split over tokens, is faster).
        sweeps = kernels is not None and _fused(q) and q.shape[0] * q.shape[1] >= torch.get_num_threads()
        dq = None
        if sweeps and need[0]:
            dq = torch.ops.fastml.linear_attention_bwd_sweep(do, None, None, q, k, v, run.o, run.den, run.kv0,
                                                             run.z0, *args, 0)[0]
        work.wait()
        # c_r is in the prefix of every later rank, and in the final state returned on every rank: the sum is the
        # gradient of this slice's final state (its start plus c_r). The last rank's reaches nothing else.
        gkv = gz = None
        if ctx.rank < ctx.world - 1 or ctx.with_total:
            d_c = gathered[ctx.rank + 1:, :n].sum(0)
            if ctx.with_total:
                d_c = d_c + gathered[:, n:].sum(0)
            gkv, gz = (t.contiguous() for t in _split(d_c, ctx.shapes))
        if sweeps:
            _, dk, dv, dkv0, dz0 = torch.ops.fastml.linear_attention_bwd_sweep(do, gkv, gz, q, k, v, run.o, run.den,
                                                                               run.kv0, run.z0, *args, 1)
        elif kernels is not None:
            dq, dk, dv, dkv0, dz0 = kernels[1](do, gkv, gz, q, k, v, run.o, run.den, run.kv0, run.z0, None, *args)
        else:
            dq, dk, dv, dkv0, dz0 = _reference_backward(run, do, gkv, gz)
        # Rank 0's start is the user's initial state: its gradient is the slice's start gradient (which includes
        # what reached the final state). Past rank 0 the start belongs to the earlier ranks, served above.
        first = ctx.rank == 0 and run.kv0 is not None
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dkv0 if first and need[3] else None, dz0 if first and need[4] else None,
                None, None, None, None, None, None, None, None, None)


def _reference_backward(run, do, gkv, gz):
    """The reference slice's gradients by autograd, its final state fed (gkv, gz) when given."""
    (o, fkv, fz), leaves = run.graph
    outs, grads = [o], [do]
    if gkv is not None:
        outs += [fkv, fz]
        grads += [gkv, gz]
    wanted = [i for i, t in enumerate(leaves) if t is not None and t.requires_grad]
    got = torch.autograd.grad(outs, [leaves[i] for i in wanted], grads, allow_unused=True)
    result = [None] * 5
    for i, g in zip(wanted, got):
        result[i] = g
    return tuple(result)


# Tokens per step of the torch form of a slice's contribution: phi(k) of a chunk stays a few MB, in cache, instead
# of a tensor the size of k allocated (and page-faulted in) on every call.
CHUNK = 4096


def _phi(x, code, sd):
    """phi(x) in the state dtype, as a fresh tensor when the map is a named one."""
    x = x.to(sd)
    if code == 1:
        return F.elu(x).add_(1.0)
    if code == 2:
        return F.relu(x)
    return x


def _fused(t):
    """Whether the C++ kernels of the state sums serve tensor t (CPU tensors, extension built)."""
    return t.device.type == "cpu" and _backend._extension_error() is None


def _contribution(k, v, code, sd, kernels=True):
    """c_r = (sum_t phi(k_t) v_t^T, sum_t phi(k_t)) over this rank's slice, in the state dtype: one C++ pass over
    the slice on the CPU for the kernel backends (fastml::linear_attention_kv_sum), batched matrix products
    elsewhere (on GPUs, and for the reference backend, which stays in torch)."""
    if kernels and _fused(k):
        return torch.ops.fastml.linear_attention_kv_sum(k, v, code)
    B, H, T, K = k.shape
    V = v.shape[-1]
    k3, v3 = k.reshape(B * H, T, K), v.reshape(B * H, T, V)
    kv = k.new_zeros(B * H, K, V, dtype=sd)
    z = k.new_zeros(B * H, K, dtype=sd)
    for s in range(0, T, CHUNK):
        kf = _phi(k3[:, s:s + CHUNK], code, sd)
        kv.baddbmm_(kf.transpose(1, 2), v3[:, s:s + CHUNK].to(sd))
        z.add_(kf.sum(1))
    return kv.view(B, H, K, V), z.view(B, H, K)


def _split(flat, shapes):
    kv_shape, z_shape = shapes
    n = kv_shape.numel()
    return flat[:n].view(kv_shape), flat[n:].view(z_shape)


def _count(flat, world):
    STATS["exchanges"] += 1
    STATS["state_bytes_sent"] += flat.numel() * flat.element_size() * (world - 1)


def causal_linear_attention(q, k, v, *, group=None, feature_map=None, normalize=True, eps=1e-6, scale=1.0,
                            initial_state=None, output_final_state=False, backend="auto", **unsupported):
    """Causal linear attention over one sequence split across the ranks of a torch.distributed group.

    Rank r of `group` (default: the world) passes its contiguous slice q, k [B, H, T_r, K], v [B, H, T_r, V], the
    ranks in sequence order; slices may differ in length (zero included). Every option means what it means in
    fastml.causal_linear_attention and must be the same on every rank (a callable feature_map is applied by
    each rank to its slice). initial_state is given on rank 0 only; output_final_state=True returns the whole
    sequence's final state on every rank (its gradients from all ranks add up). `backend` picks the kernels that
    run each slice, and may differ between ranks. cu_seqlens is not supported.

    Returns this rank's o [B, H, T_r, V] (and the LinearAttentionState), equal with its gradients to the
    single-process op on the concatenated sequence. Arguments are checked across the group first: a bad or
    mismatched argument on any rank raises ValueError or TypeError on every rank. When any rank's inputs require
    grad, every rank's outputs do, and every rank must run the backward through them (the backward is collective).
    """
    group = _resolve_group(group)
    rank = dist.get_rank(group)
    error, fields, impl = None, [0] * len(_FIELDS), None
    try:
        q, k, code, fields, impl = _local_checks(q, k, v, rank, group, feature_map, normalize, eps, scale,
                                           initial_state, output_final_state, backend, unsupported)
    except Exception as exc:  # noqa: BLE001  (whatever it is, every rank must hear of it)
        error = exc
    pending = exchange_records(fields, error, group, _record_device(group))
    STATS["check_bytes_sent"] += pending.out.numel() // pending.world * (pending.world - 1)
    if error is None:
        # This rank's contribution, computed while the records travel.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sd = acc_dtype(q.dtype)
        with torch.no_grad():
            if rank == dist.get_world_size(group) - 1 and not output_final_state and initial_state is None:
                # The last rank's contribution is part of the final state only: without one, none is needed.
                B, H, _, K = k.shape
                kv_c, z_c = k.new_zeros(B, H, K, v.shape[-1], dtype=sd), k.new_zeros(B, H, K, dtype=sd)
            else:
                kv_c, z_c = _contribution(k, v, _MAP_CODES.get(code, 0), sd, impl.kernels is not None)
            if initial_state is not None:
                kv_c, z_c = kv_c + initial_state[0], z_c + initial_state[1]
    agreed = _agree(pending.finish())
    needs_grad = agreed["needs_grad"]
    kv0, z0 = (None, None) if initial_state is None else initial_state
    # When some rank needs gradients, every rank's outputs must require grad so that its backward joins the
    # collective one; a rank whose own inputs need none gets a dummy leaf that does.
    anchor = None
    if needs_grad and not any(t is not None and t.requires_grad for t in (q, k, v, kv0, z0)):
        anchor = torch.zeros((), device=q.device, requires_grad=True)
    opts = dict(normalize=normalize, eps=eps, scale=scale)
    o, tkv, tz = _SequenceParallel.apply(q, k, v, kv0, z0, anchor, kv_c, z_c, group, impl, _MAP_CODES.get(code, 0),
                                         opts, output_final_state, needs_grad)
    if output_final_state:
        return o, LinearAttentionState(tkv, tz)
    return o

"""Sequence-parallel causal linear attention: one sequence split over the ranks of a torch.distributed group.

Rank r holds tokens [t_r, t_{r+1}) of the sequence. With k' = phi(k), its slice adds
    c_r = (sum_s k'_s v_s^T, sum_s k'_s)        ([B, H, K, V] and [B, H, K]; rank 0 also adds the initial state)
to the state, so rank r starts from the exclusive prefix P_r = c_0 + ... + c_{r-1} (the initial state on rank 0)
and the whole sequence ends at c_0 + ... + c_{R-1}. Each rank computes c_r with one matrix product, the ranks
all-gather the c's (one collective, B*H*K*(V+1) numbers per rank whatever the length), and each rank runs the
single-process op on its slice from P_r. In the backward the gradients of P_r (and of the final state) are
all-gathered the other way, and rank r's c_r receives the sum of those of the later ranks (and of every rank's
final state); it flows back into that rank's k and v through the matrix product. README.md has the details.
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
    _backend.select(_la.OP, _backend.Call(q.device, q.dtype, {"cu_seqlens": False, "K": K, "V": V}), backend)
    tensors = [q, k, v] + ([] if initial_state is None else list(initial_state))
    fields = [FLOAT_DTYPES.index(q.dtype), _DEVICE_TYPES[q.device.type], B, H, K, V, T,
              initial_state is not None, normalize, output_final_state, float_bits(eps), float_bits(scale),
              3 if callable(feature_map) else _MAP_CODES[feature_map], torch.is_grad_enabled(),
              any(t.requires_grad for t in tensors)]
    return q, k, code, fields


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


def _run_op(q, k, v, start, code, opts, needs_grad):
    """The single-process op on this rank's slice from `start` (None: zeros). With gradients, on detached leaves,
    so that the backward can ask it for the gradient of `start` too; returns (o, leaves)."""
    if not needs_grad:
        with torch.no_grad():
            return _la.causal_linear_attention(q, k, v, feature_map=code, initial_state=start, **opts), None
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        if start is not None:
            start = LinearAttentionState(*(t.detach().requires_grad_() for t in start))
            leaves += list(start)
        o = _la.causal_linear_attention(*leaves[:3], feature_map=code, initial_state=start, **opts)
    return o, leaves


class _SequenceParallel(torch.autograd.Function):
    """One rank's part, given its contribution c_r: the all-gather of the contributions, then the op on the slice
    from the prefix. Backward: the op's backward (which also gives the prefix's gradient), the all-gather of the
    prefix (and final state) gradients, and the contribution's gradient added into dk, dv (and the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, kv0, z0, anchor, kv_c, z_c, group, code, opts, with_total, needs_grad):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        shapes = (kv_c.shape, z_c.shape)
        flat = torch.cat([kv_c.reshape(-1), z_c.reshape(-1)])
        gathered = flat.new_empty(world, flat.numel())
        work = dist.all_gather_single(gathered.view(-1), flat, group=group, async_op=True)
        _count(flat, world)
        if rank == 0:
            # The first rank needs nothing from the others: its slice runs while the contributions travel.
            o, leaves = _run_op(q, k, v, None if kv0 is None else (kv0, z0), code, opts, needs_grad)
            work.wait()
        else:
            work.wait()
            prefix = _split(gathered[:rank].sum(0), shapes)
            o, leaves = _run_op(q, k, v, prefix, code, opts, needs_grad)
        total = _split(gathered.sum(0), shapes)
        if needs_grad:
            ctx.graph = (o, leaves)
            ctx.save_for_backward(k, v)
            ctx.group, ctx.rank, ctx.world, ctx.code, ctx.shapes = group, rank, world, code, shapes
            ctx.with_total = with_total
        else:
            ctx.graph = None
        o = o.detach()
        return o, total[0], total[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dtkv, dtz):
        if ctx.graph is None:
            raise RuntimeError("the sequence-parallel op ran without gradients (no rank's inputs required grad)")
        k, v = ctx.saved_tensors
        o, leaves = ctx.graph
        wanted = [i for i, t in enumerate(leaves or []) if t.requires_grad]
        grads = [None] * 5
        if wanted:
            got = torch.autograd.grad(o, [leaves[i] for i in wanted], do, retain_graph=True, allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        dq, dk, dv, dstart_kv, dstart_z = grads
        n = ctx.shapes[0].numel() + ctx.shapes[1].numel()
        # Rank 0's start is the initial state, not a prefix of other ranks' contributions: it sends zeros.
        parts = [torch.cat([dstart_kv.reshape(-1), dstart_z.reshape(-1)]) if ctx.rank > 0 and dstart_kv is not None
                 else do.new_zeros(n, dtype=dtkv.dtype)]
        if ctx.with_total:
            parts.append(torch.cat([dtkv.reshape(-1), dtz.reshape(-1)]))
        flat = torch.cat(parts)
        gathered = flat.new_empty(ctx.world, flat.numel())
        dist.all_gather_single(gathered.view(-1), flat, group=ctx.group)
        _count(flat, ctx.world)
        # c_r is in the prefix of every later rank, and in the final state returned on every rank.
        d_c = gathered[ctx.rank + 1:, :n].sum(0)
        if ctx.with_total:
            d_c = d_c + gathered[:, n:].sum(0)
        dS, dz = _split(d_c, ctx.shapes)
        # The last rank's contribution reaches nothing but the final state: without one, its gradient is zero.
        last_without_total = ctx.rank == ctx.world - 1 and not ctx.with_total
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not last_without_total:
            dk, dv = _add_contribution_grads(k, v, dS, dz, _MAP_CODES.get(ctx.code, 0), dk, dv,
                                             ctx.needs_input_grad[1:3])
        dkv0 = dz0 = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # c_0 = (rank 0's slice) + initial state, and rank 0's slice starts from the initial state.
            dkv0 = dS if dstart_kv is None else dstart_kv + dS
            dz0 = dz if dstart_z is None else dstart_z + dz
        return dq, dk, dv, dkv0, dz0, None, None, None, None, None, None, None, None


# Tokens per step when computing a slice's contribution and its gradient: the temporaries (phi(k) of a chunk, the
# chunk's share of dk) stay a few MB, in cache, instead of tensors the size of k allocated (and page-faulted in)
# on every call.
CHUNK = 4096


def _phi(x, code, sd):
    """phi(x) in the state dtype, as a fresh tensor when the map is a named one."""
    x = x.to(sd)
    if code == 1:
        return F.elu(x).add_(1.0)
    if code == 2:
        return F.relu(x)
    return x


def _contribution(k, v, code, sd):
    """c_r = (sum_t phi(k_t) v_t^T, sum_t phi(k_t)) over this rank's slice, in the state dtype."""
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


def _add_contribution_grads(k, v, dS, dz, code, dk, dv, needed):
    """dk += phi'(k) * (v dS^T + dz) and dv += phi(k) dS, the gradient through c_r, accumulated chunk by chunk
    into the op's fresh gradient buffers."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    sd = dS.dtype
    need_k, need_v = needed
    k3, v3 = k.reshape(B * H, T, K), v.reshape(B * H, T, V)
    dS3, dz3 = dS.reshape(B * H, K, V), dz.reshape(B * H, 1, K)
    if need_k:
        dk = torch.zeros_like(k) if dk is None else dk.contiguous()
        dk3 = dk.view(B * H, T, K)
    if need_v:
        dv = torch.zeros_like(v) if dv is None else dv.contiguous()
        dv3 = dv.view(B * H, T, V)
    for s in range(0, T, CHUNK):
        kc = k3[:, s:s + CHUNK]
        kf = _phi(kc, code, sd)
        if need_v:
            if dv3.dtype == sd:
                dv3[:, s:s + CHUNK].baddbmm_(kf, dS3)
            else:
                dv3[:, s:s + CHUNK].add_(torch.bmm(kf, dS3))
        if need_k:
            extra = torch.baddbmm(dz3, v3[:, s:s + CHUNK].to(sd), dS3.transpose(1, 2))
            if code == 1:      # elu(x) + 1: derivative 1 above 0, exp(x) = phi(x) below
                dk3[:, s:s + CHUNK].addcmul_(extra, kf.clamp_(max=1.0))
            elif code == 2:    # relu: derivative 1 above 0, 0 below
                dk3[:, s:s + CHUNK].addcmul_(extra, kc > 0)
            else:
                dk3[:, s:s + CHUNK].add_(extra)
    return dk, dv


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
    error, fields = None, [0] * len(_FIELDS)
    try:
        q, k, code, fields = _local_checks(q, k, v, rank, group, feature_map, normalize, eps, scale,
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
                kv_c, z_c = _contribution(k, v, _MAP_CODES.get(code, 0), sd)
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
    opts = dict(normalize=normalize, eps=eps, scale=scale, backend=backend)
    o, tkv, tz = _SequenceParallel.apply(q, k, v, kv0, z0, anchor, kv_c, z_c, group, code, opts,
                                         output_final_state, needs_grad)
    if output_final_state:
        return o, LinearAttentionState(tkv, tz)
    return o

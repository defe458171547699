"""Triton kernels for causal linear attention: the chunked forward, the decode step, and the launchers of the
torch ops fastml::linear_attention_{fwd,bwd,step}_triton (the backward kernels are in linear_attention_bwd.py).

Forward: one program per (sequence, head, value tile) walks its sequence in chunks of BT tokens, keeping the
running state S [K, BV] and normalizer z [K] in float32 on chip; only the final state is written out. Per chunk,
with A = mask(q' k'^T):  o = A v + q' S,  den = rowsum(A) + q'.z + eps,  then S += k'^T v and z += sum k'.
States are float32; float64 inputs are served by the other backends (the `triton` backend refuses them).
The launchers are registered as the kernels of the ops declared in fastml/ops/linear_attention/schema.py.
"""
import torch
import triton
import triton.language as tl

from fastml.kernels.common import (autotune, device_of, dot_types, feature_map, features, load_tile, masked_colsum,
                                   load_state, pow2, scan_program, store_state, store_tile)
from fastml._library import implement
from fastml.kernels.linear_attention_bwd import linear_attention_bwd
from fastml.ops.linear_attention.schema import FWD


def _fwd_configs():
    # 8 warps with 64 x 64 tiles is the one Hopper build without register spills (ptxas for sm_90); wider value
    # tiles read q and k fewer times. The first config is the interpreter's.
    return [triton.Config({"BT": bt, "BV": bv}, num_warps=w, num_stages=s)
            for bt, bv, w, s in ((64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 2))]


def _prune_fwd(configs, named_args, **kwargs):
    # Large chunks only pay for small head dims; BV never wider than V needs.
    args = {**named_args, **kwargs}
    BK, V = args["BK"], args["V"]
    kept = [c for c in configs if (c.kwargs["BT"] <= 64 or BK <= 128) and c.kwargs["BV"] <= pow2(V)]
    return kept or configs[:1]


@autotune(_fwd_configs(), key=["K", "V", "NORMALIZE"], prune=_prune_fwd)
@triton.jit
def _fwd_kernel(q, k, v, kv0, z0, cu, o, kv, z, den, T, H, K: tl.constexpr, V: tl.constexpr,
                eps, scale, FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_STATE: tl.constexpr,
                VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr):
    # Grid: (sequences x heads, value tiles).
    i_nh, i_v, row0, bos, eos = scan_program(cu, T, H, VARLEN)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    S, zs = load_state(kv0, z0, i_nh, ok, ov, K, V, HAS_STATE, HAS_STATE, BK, BV)
    causal = ot[:, None] >= ot[None, :]
    for i in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + i * BT + ot
        mt = rows < eos
        tok = row0 + rows
        qf = features(load_tile(q, tok, ok, mt, K, BK), ok, FMAP, K, BK) * scale
        kf = features(load_tile(k, tok, ok, mt, K, BK), ok, FMAP, K, BK)
        vb = load_tile(v, tok, ov, mt, V, BV).to(DT)
        qd = qf.to(DT)
        kd = kf.to(DT)
        d = tl.sum(qf * zs[None, :], 1) + eps
        a = tl.dot(qd, tl.trans(kd), input_precision=PREC)
        a = tl.where(causal, a, 0.0)
        d += tl.sum(a, 1)
        ob = tl.dot(a.to(DT), vb, input_precision=PREC)
        ob = tl.dot(qd, S.to(DT), acc=ob, input_precision=PREC)
        if NORMALIZE:
            ob = ob / d[:, None]
        store_tile(o, ob, tok, ov, mt, V, BV)
        if i_v == 0:
            tl.store(den + tok, d, mask=mt)
        S = tl.dot(tl.trans(kd), vb, acc=S, input_precision=PREC)
        zs += masked_colsum(kf, mt, FMAP)
    store_state(kv, z, S, zs, i_nh, ok, ov, K, V, i_v == 0)


@triton.jit
def _step_kernel(q, k, v, kv0, z0, o, kv, z, H, K: tl.constexpr, V: tl.constexpr, eps, scale,
                 FMAP: tl.constexpr, NORMALIZE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    # Grid: (batch x heads, value tiles), the large count on axis 0 as in the forward.
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    qf = tl.load(q + i_bh * K + ok, mask=mk, other=0.0).to(tl.float32)
    kf = tl.load(k + i_bh * K + ok, mask=mk, other=0.0).to(tl.float32)
    vf = tl.load(v + i_bh * V + ov, mask=mv, other=0.0).to(tl.float32)
    qf = tl.where(mk, feature_map(qf, FMAP) * scale, 0.0)
    kf = tl.where(mk, feature_map(kf, FMAP), 0.0)
    S, zs = load_state(kv0, z0, i_bh, ok, ov, K, V, True, True, BK, BV)
    S += kf[:, None] * vf[None, :]
    zs += kf
    ob = tl.sum(qf[:, None] * S, 0)
    if NORMALIZE:
        ob = ob / (tl.sum(qf * zs, 0) + eps)
    tl.store(o + i_bh * V + ov, ob.to(o.dtype.element_ty), mask=mv)
    store_state(kv, z, S, zs, i_bh, ok, ov, K, V, i_v == 0)


@implement("linear_attention_fwd", "triton")
def linear_attention_fwd_triton(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale):
    """Triton kernel of fastml::linear_attention_fwd_triton (schema.py): (o, kv, z, den)."""
    o, kv, z, den = FWD.fake(q, k, v, kv0, z0, cu_seqlens, feature_map, normalize, eps, scale)
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = kv.shape[0]
    if N * H == 0:
        return o, kv, z, den
    dt, prec = dot_types(q.dtype)
    grid = lambda meta: (N * H, triton.cdiv(V, meta["BV"]))  # noqa: E731
    with device_of(q):
        _fwd_kernel[grid](q, k, v, kv0, z0, cu_seqlens, o, kv, z, den, T, H, K, V, eps, scale,
                          FMAP=feature_map, NORMALIZE=normalize, HAS_STATE=kv0 is not None,
                          VARLEN=cu_seqlens is not None, DT=dt, PREC=prec, BK=pow2(K))
    return o, kv, z, den


@implement("linear_attention_bwd", "triton")
def linear_attention_bwd_triton(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, feature_map,
                                normalize, eps, scale):
    """Triton twin of fastml::linear_attention_bwd: (dq, dk, dv, dkv0, dz0)."""
    return linear_attention_bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, feature_map,
                                normalize, scale)


@implement("linear_attention_step", "triton")
def linear_attention_step_triton(q, k, v, kv, z, feature_map, normalize, eps, scale):
    """Triton twin of fastml::linear_attention_step: one token, (o [B,H,V], kv', z')."""
    B, H, K = q.shape
    V = v.shape[-1]
    o, kv_new, z_new = torch.empty_like(v), torch.empty_like(kv), torch.empty_like(z)
    if B * H == 0:
        return o, kv_new, z_new
    BV = min(pow2(V), 64)
    with device_of(q):
        _step_kernel[(B * H, triton.cdiv(V, BV))](q, k, v, kv, z, o, kv_new, z_new, H, K, V, eps, scale,
                                                  FMAP=feature_map, NORMALIZE=normalize, BK=pow2(K), BV=BV)
    return o, kv_new, z_new

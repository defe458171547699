"""Backward of causal linear attention in Triton: two chunked scans that recompute states instead of storing them.

With n_t = q'_t S_t, o_t = n_t / d_t and d_t = q'_t.z_t + eps (d_t = 1 without normalization):
    dn_t = do_t / d_t,   dd_t = -(do_t . o_t) / d_t,
    dq'_t = dn_t S_t^T + dd_t z_t                                   (forward scan, _dq_kernel)
    dS_t = gkv + sum_{u>=t} q'_u^T dn_u,   dz_t = gz + sum_{u>=t} dd_u q'_u
    dk'_s = dS_s v_s + dz_s,   dv_s = k'_s dS_s                      (reverse scan, _dkv_kernel)
dd acts like the gradient of an extra value column of ones, so the normalizer rides along the same products.
dkv0 = dS_0 and dz0 = dz_0. The forward scan runs first and leaves dd [B, H, T] for the reverse scan.
"""
import torch
import triton
import triton.language as tl

from fastml.kernels.common import (autotune, device_of, dot_types, feature_map_grad, features, load_tile,
                                   load_state, masked_colsum, pow2, scan_program, store_state, store_tile)

# Elements of the reverse scan's [K, BV] float32 state tile: value tiles of 128 for K <= 128 (one tile, so dk needs
# no cross-tile sum); K = 256 takes 64-wide tiles, since a 256 x 128 tile spills twice as much on sm_90.
STATE_TILE = 128 * 128


# Measured by ptxas for sm_90 (bf16, K = V = 128): 8 warps and 32-token chunks keep register spills small; the
# first config of each list is the interpreter's.
def _dq_configs():
    return [triton.Config({"BT": bt, "BK": bk}, num_warps=w, num_stages=s)
            for bt, bk, w, s in ((32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3), (64, 128, 8, 2))]


def _prune_dq(configs, named_args, **kwargs):
    # Key tiles wider than 64 only where K needs them.
    K = {**named_args, **kwargs}["K"]
    return [c for c in configs if c.kwargs["BK"] <= max(64, pow2(K))]


def _dkv_configs():
    return [triton.Config({"BT": bt}, num_warps=w, num_stages=s)
            for bt, w, s in ((32, 8, 2), (64, 8, 2), (32, 8, 3), (32, 4, 2))]


@autotune(_dq_configs(), key=["K", "V", "NORMALIZE"], prune=_prune_dq)
@triton.jit
def _dq_kernel(do, q, k, v, o, den, kv0, z0, cu, dq, dd, T, H, K: tl.constexpr, V: tl.constexpr, scale,
               FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_STATE: tl.constexpr, VARLEN: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    # One program per (sequence, head, key tile of BK); values whole (BV >= V). Grid: (sequences x heads, key
    # tiles), the batch-sized count on axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535).
    i_nh, i_k, row0, bos, eos = scan_program(cu, T, H, VARLEN)
    ok = i_k * BK + tl.arange(0, BK)
    ov = tl.arange(0, BV)
    ot = tl.arange(0, BT)
    S, zs = load_state(kv0, z0, i_nh, ok, ov, K, V, HAS_STATE, HAS_STATE, BK, BV)
    causal = ot[:, None] >= ot[None, :]
    for i in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + i * BT + ot
        mt = rows < eos
        tok = row0 + rows
        kf = features(load_tile(k, tok, ok, mt, K, BK), ok, FMAP, K, BK)
        kd = kf.to(DT)
        vb = load_tile(v, tok, ov, mt, V, BV).to(DT)
        dn = load_tile(do, tok, ov, mt, V, BV).to(tl.float32)
        if NORMALIZE:
            d = tl.load(den + tok, mask=mt, other=1.0)
            ddv = -tl.sum(dn * load_tile(o, tok, ov, mt, V, BV).to(tl.float32), 1) / d
            dn = dn / d[:, None]
            if i_k == 0:
                tl.store(dd + tok, ddv, mask=mt)
        dnd = dn.to(DT)
        m = tl.dot(dnd, tl.trans(vb), input_precision=PREC)
        if NORMALIZE:
            m += ddv[:, None]
        m = tl.where(causal, m, 0.0)
        g = tl.dot(m.to(DT), kd, input_precision=PREC)
        g = tl.dot(dnd, tl.trans(S.to(DT)), acc=g, input_precision=PREC)
        if NORMALIZE:
            # zs is z before this chunk; the chunk's own keys came in through the ones added to m.
            g += ddv[:, None] * zs[None, :]
        g = feature_map_grad(g * scale, load_tile(q, tok, ok, mt, K, BK).to(tl.float32), FMAP)
        store_tile(dq, g, tok, ok, mt, K, BK)
        S = tl.dot(tl.trans(kd), vb, acc=S, input_precision=PREC)
        zs += masked_colsum(kf, mt, FMAP)


@autotune(_dkv_configs(), key=["K", "V", "NORMALIZE"])
@triton.jit
def _dkv_kernel(do, q, k, v, den, dd, gkv, gz, cu, dk, dv, dkv0, dz0, dk_tile_stride, T, H, K: tl.constexpr,
                V: tl.constexpr, scale, FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GKV: tl.constexpr,
                HAS_GZ: tl.constexpr, VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, BT: tl.constexpr):
    # One program per (sequence, head, value tile of BV); keys whole (BK >= K). dv is exact per tile; dk is this
    # tile's share (the z path counted by tile 0 only), summed over tiles by the launcher when there are several.
    # Grid: (sequences x heads, value tiles), as _dq_kernel's.
    i_nh, i_v, row0, bos, eos = scan_program(cu, T, H, VARLEN)
    first = i_v == 0
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    dS, dz = load_state(gkv, gz, i_nh, ok, ov, K, V, HAS_GKV, HAS_GZ, BK, BV)
    # Rows are keys s, columns queries t: query t sees key s when s <= t.
    anti = ot[:, None] <= ot[None, :]
    dk_tile = dk + i_v.to(tl.int64) * dk_tile_stride
    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, n_chunks):
        rows = bos + (n_chunks - 1 - i) * BT + ot
        mt = rows < eos
        tok = row0 + rows
        kb = load_tile(k, tok, ok, mt, K, BK)
        qd = (features(load_tile(q, tok, ok, mt, K, BK), ok, FMAP, K, BK) * scale).to(DT)
        kd = features(kb, ok, FMAP, K, BK).to(DT)
        vb = load_tile(v, tok, ov, mt, V, BV).to(DT)
        dn = load_tile(do, tok, ov, mt, V, BV).to(tl.float32)
        if NORMALIZE:
            d = tl.load(den + tok, mask=mt, other=1.0)
            ddv = tl.load(dd + tok, mask=mt, other=0.0)
            dn = dn / d[:, None]
        dnd = dn.to(DT)
        at = tl.where(anti, tl.dot(kd, tl.trans(qd), input_precision=PREC), 0.0)
        gv = tl.dot(at.to(DT), dnd, input_precision=PREC)
        gv = tl.dot(kd, dS.to(DT), acc=gv, input_precision=PREC)
        store_tile(dv, gv, tok, ov, mt, V, BV)
        m = tl.dot(vb, tl.trans(dnd), input_precision=PREC)
        if NORMALIZE:
            m += tl.where(first, ddv, 0.0)[None, :]
        m = tl.where(anti, m, 0.0)
        gk = tl.dot(m.to(DT), qd, input_precision=PREC)
        gk = tl.dot(vb, tl.trans(dS.to(DT)), acc=gk, input_precision=PREC)
        gk += tl.where(first, dz, 0.0)[None, :]
        gk = feature_map_grad(gk, kb.to(tl.float32), FMAP)
        store_tile(dk_tile, gk, tok, ok, mt, K, BK)
        dS = tl.dot(tl.trans(qd), dnd, acc=dS, input_precision=PREC)
        if NORMALIZE:
            dz += tl.sum(qd.to(tl.float32) * ddv[:, None], 0)
    store_state(dkv0, dz0, dS, dz, i_nh, ok, ov, K, V, first)


def linear_attention_bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, fmap, normalize, scale):
    """(dq, dk, dv, dkv0, dz0) for fastml::linear_attention_bwd_triton; inputs contiguous, states float32."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dq, dv = torch.empty_like(q), torch.empty_like(v)
    dkv0 = q.new_empty(N, H, K, V, dtype=torch.float32)
    dz0 = q.new_empty(N, H, K, dtype=torch.float32)
    BV = min(pow2(V), max(16, STATE_TILE // pow2(K)))
    n_v = triton.cdiv(V, BV)
    # Several value tiles each hold a share of dk: float32 partials, summed below.
    dk = torch.empty_like(k) if n_v == 1 else q.new_empty(n_v, B, H, T, K, dtype=torch.float32)
    if N * H == 0:
        return dq, torch.empty_like(k), dv, dkv0, dz0
    dd = torch.empty_like(den) if normalize else den
    dt, prec = dot_types(q.dtype)
    opts = dict(FMAP=fmap, NORMALIZE=normalize, VARLEN=cu_seqlens is not None, DT=dt, PREC=prec)
    with device_of(q):
        grid = lambda meta: (N * H, triton.cdiv(K, meta["BK"]))  # noqa: E731
        _dq_kernel[grid](grad_o, q, k, v, o, den, kv0, z0, cu_seqlens, dq, dd, T, H, K, V, scale,
                         HAS_STATE=kv0 is not None, BV=pow2(V), **opts)
        _dkv_kernel[(N * H, n_v)](grad_o, q, k, v, den, dd, grad_kv, grad_z, cu_seqlens, dk, dv, dkv0, dz0,
                                  B * H * T * K, T, H, K, V, scale, HAS_GKV=grad_kv is not None,
                                  HAS_GZ=grad_z is not None, BK=pow2(K), BV=BV, **opts)
    if n_v > 1:
        dk = dk.sum(0).to(k.dtype)
    return dq, dk, dv, dkv0, dz0

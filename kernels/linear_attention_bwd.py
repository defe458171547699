"""Backward of causal linear attention in Triton: two chunked scans that recompute states instead of storing them.

With n_t = q'_t S_t, o_t = n_t / d_t and d_t = q'_t.z_t + eps (d_t = 1 without normalization):
    dn_t = do_t / d_t,   dd_t = -(do_t . o_t) / d_t,
    dq'_t = dn_t S_t^T + dd_t z_t                                   (forward scan, _dq_kernel)
    dS_t = gkv + sum_{u>=t} q'_u^T dn_u,   dz_t = gz + sum_{u>=t} dd_u q'_u
    dk'_s = dS_s v_s + dz_s,   dv_s = k'_s dS_s                      (reverse scan, _dkv_kernel)
dd acts like the gradient of an extra value column of ones, so the normalizer rides along the same products.
The reverse scan gives dv and dk to different programs (value tiles and key tiles of dS), so neither holds the
whole [K, V] state with both gradients' operands, and each gradient is written whole by one program.
dkv0 = dS_0 and dz0 = dz_0. The forward scan runs first and leaves dd [B, H, T] for the reverse scan.
"""
import torch
import triton
import triton.language as tl

from fastml.kernels.common import (autotune, device_of, dot_types, feature_map_grad, features, load_tile,
                                   masked_colsum, pow2, segment, store_tile)

# Measured by ptxas for sm_90 with the launcher's 16-byte alignment (bf16, K = V = 128): the dq configs build
# without spills in both modes except 64 x 128 under normalization (336 bytes); the reverse-scan configs with
# 8 warps and 64-wide tiles none (161 registers, 220 normalized), 4 warps or 128-wide tiles only under
# normalization (120-208 bytes). The first config of each list is the interpreter's.
def _dq_configs():
    return [triton.Config({"BT": bt, "BK": bk}, num_warps=w, num_stages=s)
            for bt, bk, w, s in ((32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2))]


def _prune_dq(configs, named_args, **kwargs):
    # Key tiles wider than 64 only where K needs them.
    K = {**named_args, **kwargs}["K"]
    return [c for c in configs if c.kwargs["BK"] <= max(64, pow2(K))]


def _dkv_configs():
    return [triton.Config({"BT": bt, "BS": bs}, num_warps=w, num_stages=s)
            for bt, bs, w, s in ((64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2))]


def _prune_dkv(configs, named_args, **kwargs):
    # Tiles no wider than the wider head dim needs.
    args = {**named_args, **kwargs}
    kept = [c for c in configs if c.kwargs["BS"] <= max(16, pow2(args["K"]), pow2(args["V"]))]
    return kept or configs[:1]


@autotune(_dq_configs(), key=["K", "V", "NORMALIZE"], prune=_prune_dq)
@triton.jit
def _dq_kernel(do, q, k, v, o, den, kv0, z0, cu, dq, dd, T, H, K: tl.constexpr, V: tl.constexpr, scale,
               FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_STATE: tl.constexpr, VARLEN: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    # One program per (sequence, head, key tile of BK); values whole (BV >= V).
    i_k = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    b, bos, eos = segment(cu, i_n, T, VARLEN)
    row0 = (b * H + i_h).to(tl.int64) * T
    ok = i_k * BK + tl.arange(0, BK)
    ov = tl.arange(0, BV)
    ot = tl.arange(0, BT)
    mk = ok < K
    mv = ov < V
    if HAS_STATE:
        S = tl.load(kv0 + i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
        zs = tl.load(z0 + i_nh.to(tl.int64) * K + ok, mask=mk, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        zs = tl.zeros([BK], dtype=tl.float32)
    causal = ot[:, None] >= ot[None, :]
    for i in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + i * BT + ot
        mt = rows < eos
        tok = row0 + rows
        kf = features(load_tile(k, tok, ok, mt, K, BK), ok, FMAP, K, BK)
        kd = kf.to(DT)
        zs_next = zs + masked_colsum(kf, mt, FMAP)  # now, not at the end: kf would hold registers till then
        vb = load_tile(v, tok, ov, mt, V, BV).to(DT)
        dn = load_tile(do, tok, ov, mt, V, BV).to(tl.float32)
        if NORMALIZE:
            r = 1.0 / tl.load(den + tok, mask=mt, other=1.0)
            ddv = -tl.sum(dn * load_tile(o, tok, ov, mt, V, BV).to(tl.float32), 1) * r
            dn *= r[:, None]
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
        zs = zs_next


@triton.jit
def _dv_scan(do, q, k, den, gkv, tok0, bos, eos, i_v, i_nh, dv, dkv0, scale, K: tl.constexpr, V: tl.constexpr,
             FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GKV: tl.constexpr, DT: tl.constexpr,
             PREC: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    # Value tile i_v of BS columns, keys whole: dv_s = mask(k' q'^T) dn + k'_s dS_s, state dS[:, tile].
    ok = tl.arange(0, BK)
    ov = i_v * BS + tl.arange(0, BS)
    ot = tl.arange(0, BT)
    m_kv = (ok < K)[:, None] & (ov < V)[None, :]
    s_off = i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :]
    if HAS_GKV:
        dS = tl.load(gkv + s_off, mask=m_kv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BS], dtype=tl.float32)
    # Rows are keys s, columns queries t: query t sees key s when s <= t.
    anti = ot[:, None] <= ot[None, :]
    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, n_chunks):
        rows = bos + (n_chunks - 1 - i) * BT + ot
        mt = rows < eos
        tok = tok0 + rows
        qd = (features(load_tile(q, tok, ok, mt, K, BK), ok, FMAP, K, BK) * scale).to(DT)
        kd = features(load_tile(k, tok, ok, mt, K, BK), ok, FMAP, K, BK).to(DT)
        dn = load_tile(do, tok, ov, mt, V, BS).to(tl.float32)
        if NORMALIZE:
            dn *= (1.0 / tl.load(den + tok, mask=mt, other=1.0))[:, None]
        dnd = dn.to(DT)
        at = tl.where(anti, tl.dot(kd, tl.trans(qd), input_precision=PREC), 0.0)
        gv = tl.dot(at.to(DT), dnd, input_precision=PREC)
        gv = tl.dot(kd, dS.to(DT), acc=gv, input_precision=PREC)
        store_tile(dv, gv, tok, ov, mt, V, BS)
        dS = tl.dot(tl.trans(qd), dnd, acc=dS, input_precision=PREC)
    tl.store(dkv0 + s_off, dS, mask=m_kv)


@triton.jit
def _dk_scan(do, q, k, v, den, dd, gkv, gz, tok0, bos, eos, i_k, i_nh, dk, dz0, scale, K: tl.constexpr,
             V: tl.constexpr, FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GKV: tl.constexpr,
             HAS_GZ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
             BT: tl.constexpr):
    # Key tile i_k of BS columns, values whole: dk'_s = mask(v dn^T + dd) q' + v_s dS_s^T + dz_s, state dS[tile, :].
    ok = i_k * BS + tl.arange(0, BS)
    ov = tl.arange(0, BV)
    ot = tl.arange(0, BT)
    mk = ok < K
    if HAS_GKV:
        dS = tl.load(gkv + i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                     mask=mk[:, None] & (ov < V)[None, :], other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BS, BV], dtype=tl.float32)
    if HAS_GZ:
        dz = tl.load(gz + i_nh.to(tl.int64) * K + ok, mask=mk, other=0.0).to(tl.float32)
    else:
        dz = tl.zeros([BS], dtype=tl.float32)
    anti = ot[:, None] <= ot[None, :]
    n_chunks = tl.cdiv(eos - bos, BT)
    for i in range(0, n_chunks):
        rows = bos + (n_chunks - 1 - i) * BT + ot
        mt = rows < eos
        tok = tok0 + rows
        qd = (features(load_tile(q, tok, ok, mt, K, BS), ok, FMAP, K, BS) * scale).to(DT)
        vb = load_tile(v, tok, ov, mt, V, BV).to(DT)
        dn = load_tile(do, tok, ov, mt, V, BV).to(tl.float32)
        if NORMALIZE:
            dn *= (1.0 / tl.load(den + tok, mask=mt, other=1.0))[:, None]
        dnd = dn.to(DT)
        m = tl.dot(vb, tl.trans(dnd), input_precision=PREC)
        if NORMALIZE:
            ddv = tl.load(dd + tok, mask=mt, other=0.0)
            m += ddv[None, :]
        m = tl.where(anti, m, 0.0)
        gk = tl.dot(m.to(DT), qd, input_precision=PREC)
        gk = tl.dot(vb, tl.trans(dS.to(DT)), acc=gk, input_precision=PREC)
        gk += dz[None, :]
        if FMAP != 0:
            gk = feature_map_grad(gk, load_tile(k, tok, ok, mt, K, BS).to(tl.float32), FMAP)
        store_tile(dk, gk, tok, ok, mt, K, BS)
        dS = tl.dot(tl.trans(qd), dnd, acc=dS, input_precision=PREC)
        if NORMALIZE:
            dz += tl.sum(qd.to(tl.float32) * ddv[:, None], 0)
    tl.store(dz0 + i_nh.to(tl.int64) * K + ok, dz, mask=mk)


@autotune(_dkv_configs(), key=["K", "V", "NORMALIZE"], prune=_prune_dkv)
@triton.jit
def _dkv_kernel(do, q, k, v, den, dd, gkv, gz, cu, dk, dv, dkv0, dz0, T, H, K: tl.constexpr, V: tl.constexpr, scale,
                FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GKV: tl.constexpr, HAS_GZ: tl.constexpr,
                VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BS: tl.constexpr, BT: tl.constexpr):
    # The reverse scan, split by what each program writes: programs [0, n_v) own value tiles of BS columns (dv and
    # dkv0), the next ones key tiles of BS columns (dk and dz0). The tiles of one head are neighbours in the grid,
    # so the inputs they share are read from DRAM once and from L2 after.
    i_s = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    b, bos, eos = segment(cu, i_n, T, VARLEN)
    tok0 = (b * H + i_h).to(tl.int64) * T
    n_v = tl.cdiv(V, BS)
    if i_s < n_v:
        _dv_scan(do, q, k, den, gkv, tok0, bos, eos, i_s, i_nh, dv, dkv0, scale, K, V, FMAP, NORMALIZE, HAS_GKV,
                 DT, PREC, BK, BS, BT)
    else:
        _dk_scan(do, q, k, v, den, dd, gkv, gz, tok0, bos, eos, i_s - n_v, i_nh, dk, dz0, scale, K, V, FMAP,
                 NORMALIZE, HAS_GKV, HAS_GZ, DT, PREC, BV, BS, BT)


def linear_attention_bwd(grad_o, grad_kv, grad_z, q, k, v, o, den, kv0, z0, cu_seqlens, fmap, normalize, scale):
    """(dq, dk, dv, dkv0, dz0) for fastml::linear_attention_bwd_triton; inputs contiguous, states float32."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dkv0 = q.new_empty(N, H, K, V, dtype=torch.float32)
    dz0 = q.new_empty(N, H, K, dtype=torch.float32)
    if N * H == 0:
        return dq, dk, dv, dkv0, dz0
    dd = torch.empty_like(den) if normalize else den
    dt, prec = dot_types(q.dtype)
    opts = dict(FMAP=fmap, NORMALIZE=normalize, VARLEN=cu_seqlens is not None, DT=dt, PREC=prec)
    with device_of(q):
        grid = lambda meta: (triton.cdiv(K, meta["BK"]), N * H)  # noqa: E731
        _dq_kernel[grid](grad_o, q, k, v, o, den, kv0, z0, cu_seqlens, dq, dd, T, H, K, V, scale,
                         HAS_STATE=kv0 is not None, BV=pow2(V), **opts)
        grid = lambda meta: (triton.cdiv(V, meta["BS"]) + triton.cdiv(K, meta["BS"]), N * H)  # noqa: E731
        _dkv_kernel[grid](grad_o, q, k, v, den, dd, grad_kv, grad_z, cu_seqlens, dk, dv, dkv0, dz0, T, H, K, V, scale,
                          HAS_GKV=grad_kv is not None, HAS_GZ=grad_z is not None, BK=pow2(K), BV=pow2(V), **opts)
    return dq, dk, dv, dkv0, dz0

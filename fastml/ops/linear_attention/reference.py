"""Plain-PyTorch reference for linear attention: the source of truth the kernels are checked against.

Chunked form: within a chunk of C tokens the causal sum is a masked [C, C] product; across chunks it is a cumulative
sum of per-chunk states k'^T v. Memory is O(T/C * K * V + T * C) per head, never O(T * K * V). Everything is
computed in the state dtype (float32, or float64 for float64 inputs), so float64 inputs give exact results.
"""
import torch
import torch.nn.functional as F

from fastml._numerics import acc_dtype

CHUNK = 64
FEATURE_MAPS = {None: 0, "elu+1": 1, "relu": 2}


def apply_feature_map(x, code):
    if code == 1:
        return F.elu(x) + 1.0
    if code == 2:
        return F.relu(x)
    return x


def _causal_one(q, k, v, kv0, z0, normalize, eps):
    """One batch of independent sequences. q,k [B,H,T,K], v [B,H,T,V], kv0 [B,H,K,V], z0 [B,H,K], all feature-
    mapped and in the state dtype. Returns o [B,H,T,V], kv [B,H,K,V], z [B,H,K]."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return v.new_zeros(B, H, 0, V), kv0, z0
    C = CHUNK
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = (T + pad) // C
    q = q.reshape(B, H, N, C, K)
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    # State after each chunk, and the state each chunk starts from.
    kv_after = kv0.unsqueeze(2) + torch.matmul(k.transpose(-1, -2), v).cumsum(2)  # [B,H,N,K,V]
    z_after = z0.unsqueeze(2) + k.sum(3).cumsum(2)  # [B,H,N,K]
    kv_before = torch.cat([kv0.unsqueeze(2), kv_after[:, :, :-1]], dim=2)
    z_before = torch.cat([z0.unsqueeze(2), z_after[:, :, :-1]], dim=2)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    att = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~mask, 0.0)  # [B,H,N,C,C]
    o = torch.matmul(att, v) + torch.matmul(q, kv_before)
    if normalize:
        den = att.sum(-1) + torch.matmul(q, z_before.unsqueeze(-1)).squeeze(-1) + eps  # [B,H,N,C]
        o = o / den.unsqueeze(-1)
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    return o, kv_after[:, :, -1], z_after[:, :, -1]


def _prepare(q, k, v, feature_map, scale):
    sd = acc_dtype(q.dtype)
    qf = apply_feature_map(q.to(sd), feature_map) * scale
    kf = apply_feature_map(k.to(sd), feature_map)
    return qf, kf, v.to(sd), sd


def causal_linear_attention(q, k, v, *, feature_map=0, normalize=True, eps=1e-6, scale=1.0, initial_state=None,
                            cu_seqlens=None):
    """o_t = q'_t S_t / (q'_t . z_t + eps) with S_t = S_0 + sum_{s<=t} k'_s v_s^T, z_t = z_0 + sum_{s<=t} k'_s.

    q,k [B,H,T,K], v [B,H,T,V]; feature_map is a code of FEATURE_MAPS; initial_state (kv0 [N,H,K,V], z0 [N,H,K])
    or None. Returns (o [B,H,T,V] in q's dtype, kv [N,H,K,V], z [N,H,K]) with the states in the state dtype.
    """
    qf, kf, vf, sd = _prepare(q, k, v, feature_map, scale)
    B, H, T, K = qf.shape
    V = vf.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        kv0 = qf.new_zeros(N, H, K, V)
        z0 = qf.new_zeros(N, H, K)
    else:
        kv0, z0 = initial_state
    if cu_seqlens is None:
        o, kv, z = _causal_one(qf, kf, vf, kv0, z0, normalize, eps)
        return o.to(q.dtype), kv, z
    bounds = cu_seqlens.tolist()
    outs, kvs, zs = [], [], []
    for i in range(N):
        s, e = bounds[i], bounds[i + 1]
        o, kv, z = _causal_one(qf[:, :, s:e], kf[:, :, s:e], vf[:, :, s:e], kv0[i:i + 1], z0[i:i + 1], normalize, eps)
        outs.append(o)
        kvs.append(kv)
        zs.append(z)
    o = torch.cat(outs, dim=2) if outs else vf.new_zeros(1, H, 0, V)
    return o.to(q.dtype), torch.cat(kvs), torch.cat(zs)


def linear_attention_step(q, k, v, state, *, feature_map=0, normalize=True, eps=1e-6, scale=1.0):
    """One decode step: q,k [B,H,K], v [B,H,V]; state (kv [B,H,K,V], z [B,H,K]). Returns (o, (kv', z'))."""
    qf, kf, vf, _ = _prepare(q, k, v, feature_map, scale)
    kv0, z0 = state
    kv = kv0 + kf.unsqueeze(-1) * vf.unsqueeze(-2)
    z = z0 + kf
    o = torch.matmul(qf.unsqueeze(-2), kv).squeeze(-2)
    if normalize:
        o = o / ((qf * z).sum(-1, keepdim=True) + eps)
    return o.to(q.dtype), kv, z


def linear_attention(q, k, v, *, feature_map=0, normalize=True, eps=1e-6, scale=1.0, key_padding_mask=None):
    """Non-causal: o = q' S / (q' . z + eps), S = sum_s k'_s v_s^T and z = sum_s k'_s over unmasked keys.

    q [B,H,Tq,K], k [B,H,Tk,K], v [B,H,Tk,V], key_padding_mask [B,Tk] bool (True = ignore).
    """
    qf, kf, vf, _ = _prepare(q, k, v, feature_map, scale)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        kf = kf.masked_fill(pad, 0.0)
        vf = vf.masked_fill(pad, 0.0)
    kv = torch.matmul(kf.transpose(-1, -2), vf)  # [B,H,K,V]
    o = torch.matmul(qf, kv)
    if normalize:
        o = o / (torch.matmul(qf, kf.sum(2).unsqueeze(-1)) + eps)
    return o.to(q.dtype)
